"""Kernel Gateway's options -> kgpool settings: the command line, KG_* and the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kgpool.errors import ConfigError
from kgpool.kgcompat import is_kernel_gateway_argv, translate

pytestmark = [pytest.mark.timeout(30), pytest.mark.channel_independent]
API = "--KernelGatewayApp.api=kernel_gateway.notebook_http"


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Jupyter config folder: no config file of the machine's leaks into a test."""
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path))
    return tmp_path


def test_which_command_lines_are_kernel_gateways() -> None:
    assert is_kernel_gateway_argv([API, "--KernelGatewayApp.seed_uri=x.ipynb"])
    assert is_kernel_gateway_argv(["--port=9000", "--KernelGatewayApp.seed_uri=x"])
    assert is_kernel_gateway_argv([])
    assert not is_kernel_gateway_argv(["serve", "x.ipynb"])
    assert not is_kernel_gateway_argv(["--version"])


def test_the_seed_tutorials_command_line(config_dir: Path) -> None:
    t = translate([API, "--KernelGatewayApp.seed_uri=./Notebook.ipynb"], {})
    assert t.values == {"notebooks": ("./Notebook.ipynb",)}
    assert t.notes == []


def test_command_line_beats_config_file_beats_environment(config_dir: Path) -> None:
    (config_dir / "jupyter_kernel_gateway_config.py").write_text(
        "c.KernelGatewayApp.ip = '*'\nc.KernelGatewayApp.port = 9000\n"
        "c.KernelGatewayApp.prespawn_count = 2\n")
    env = {"KG_PORT": "7000", "KG_PRESPAWN_COUNT": "5", "KG_SEED_URI": "env.ipynb",
           "KG_BASE_URL": "/v1"}
    t = translate(["--port=10100"], env)
    assert t.values == {"host": "*", "port": 10100, "kernels": 2, "notebooks": ("env.ipynb",),
                        "base_url": "/v1"}
    assert translate([], env).values["port"] == 9000


def test_config_file_named_on_the_command_line(config_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.py"
    other.write_text("c.KernelGatewayApp.seed_uri = 'from-file.ipynb'\n"
                     "c.NotebookHTTPPersonality.static_path = '/srv/www'\n")
    t = translate([f"--config={other}"], {})
    assert t.values == {"notebooks": ("from-file.ipynb",), "static_path": "/srv/www"}


def test_every_mapped_option(config_dir: Path) -> None:
    t = translate([
        "--KernelGatewayApp.seed_uri='quoted.ipynb'",  # exec-form command lines keep quotes
        "--KernelGatewayApp.prespawn_count", "3", "--ip", "0.0.0.0",
        "--KernelGatewayApp.base_url=/kg", "--KernelGatewayApp.auth_token=t0k",
        "--KernelGatewayApp.allow_origin=*", "--KernelGatewayApp.allow_methods=GET",
        "--KernelGatewayApp.allow_headers=X-A", "--KernelGatewayApp.expose_headers=X-B",
        "--KernelGatewayApp.max_age=60", "--KernelGatewayApp.allow_credentials=True",
        "--KernelGatewayApp.trust_xheaders=True", "--KernelGatewayApp.force_kernel_name=python3",
        "--KernelGatewayApp.certfile=c.pem", "--KernelGatewayApp.keyfile=k.pem",
        "--client-ca=ca.pem", "--NotebookHTTPPersonality.allow_notebook_download=True",
        "--NotebookHTTPPersonality.static_path=www",
        "--NotebookHTTPPersonality.comment_prefix={'python': '##', None: '#'}",
        "--KernelGatewayApp.log_level=WARN"], {})
    assert t.values == {
        "notebooks": ("quoted.ipynb",), "kernels": 3, "host": "0.0.0.0", "base_url": "/kg",
        "auth_token": "t0k", "allow_origin": "*", "allow_methods": "GET",
        "allow_headers": "X-A", "expose_headers": "X-B", "max_age": 60,
        "allow_credentials": True, "trust_xheaders": True, "kernel_name": "python3",
        "certfile": "c.pem", "keyfile": "k.pem", "client_ca": "ca.pem",
        "allow_notebook_download": True, "static_path": "www",
        "comment_prefix": "python=##,*=#", "log_level": "warning"}


def test_environment_is_parsed_as_kernel_gateway_parses_it(config_dir: Path) -> None:
    env = {"KG_SEED_URI": "x.ipynb", "KG_ALLOW_NOTEBOOK_DOWNLOAD": "true",  # only "True" is on
           "KG_TRUST_XHEADERS": "TRUE", "KG_STATIC_PATH": "pub", "KG_FORCE_KERNEL_NAME": "ir",
           "KG_AUTH_TOKEN": "s", "KG_IP": "*", "KG_PRESPAWN_COUNT": "0"}
    t = translate([], env)
    assert t.values == {"notebooks": ("x.ipynb",), "allow_notebook_download": False,
                        "trust_xheaders": True, "static_path": "pub", "kernel_name": "ir",
                        "auth_token": "s", "host": "*", "kernels": 1}
    with pytest.raises(ConfigError, match="KG_PORT"):
        translate([], {**env, "KG_PORT": "eighty"})


def test_debug_flag_and_numeric_log_levels(config_dir: Path) -> None:
    seed = "--KernelGatewayApp.seed_uri=x"
    assert translate([seed, "--debug"], {}).values["log_level"] == "debug"
    assert translate([seed, "--log-level=40"], {}).values["log_level"] == "error"


@pytest.mark.parametrize("option,why", [
    ("--KernelGatewayApp.port_retries=0", "never moves to another port"),
    ("--KernelGatewayApp.env_process_whitelist=['A']", "inherit"),
    ("--KernelGatewayApp.default_kernel_name=ir", "kernelspec"),
    ("--KernelGatewayApp.ws_ping_interval=5", "websocket"),
    ("--MappingKernelManager.cull_idle_timeout=60", "MappingKernelManager"),
    ("--KernelGatewayApp.no_such_option=1", "no such option"),
])
def test_options_without_effect_are_named_with_the_reason(config_dir: Path, option: str,
                                                           why: str) -> None:
    t = translate(["--KernelGatewayApp.seed_uri=x", option], {})
    (note,) = t.notes
    assert option.split("=")[0].lstrip("-") in note and why in note and "ignored" in note


@pytest.mark.parametrize("option,message", [
    ("--KernelGatewayApp.api=kernel_gateway.jupyter_websocket", "notebook-http only"),
    ("--NotebookHTTPPersonality.cell_parser=kernel_gateway.notebook_http.swagger.parser",
     "not supported"),
    ("--KernelGatewayApp.kernel_manager_class=my.Manager", "plug-in"),
    ("--KernelGatewayApp.max_kernels=1", "more than max_kernels"),
    ("--generate-config", "generate-config"),
    ("stray-argument", "seed_uri=NOTEBOOK"),
    ("--KernelGatewayApp.prespawn_count=many", "bad Kernel Gateway option"),
])
def test_options_kgpool_cannot_honour_stop_it(config_dir: Path, option: str,
                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        translate(["--KernelGatewayApp.seed_uri=x", "--KernelGatewayApp.prespawn_count=2",
                   option], {})


def test_a_notebook_is_required(config_dir: Path) -> None:
    with pytest.raises(ConfigError, match="seed_uri"):
        translate([API], {})


def test_notebook_http_aliases_are_accepted(config_dir: Path) -> None:
    for api in ("notebook-http", "kernel_gateway.notebook_http"):
        assert translate([f"--api={api}", "--seed_uri=x"], {}).values == {"notebooks": ("x",)}
