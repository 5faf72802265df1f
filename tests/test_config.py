"""Settings: validation at the edge, derived values, secrets kept from kernels."""

from __future__ import annotations

import pytest

from kgpool.config import SECRET_ENV, Settings
from kgpool.errors import ConfigError

pytestmark = [pytest.mark.timeout(10), pytest.mark.channel_independent]


def settings(**kw: object) -> Settings:
    return Settings(notebooks=("x.ipynb",), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value,message", [
    ("kernels", 0, "--kernels"), ("port", 70000, "--port"), ("timeout", -1, "--timeout"),
    ("max_queue", -1, "--max-queue"), ("max_response_size", -5, "--max-response-size"),
    ("init_timeout", 0, "--init-timeout"), ("channel", "pigeon", "--channel"),
    ("log_format", "xml", "--log-format"), ("log_level", "loud", "--log-level"),
    ("ready_kernels", -1, "--ready-kernels"), ("base_url", "v1", "--base-url"),
    ("base_url", "/a b", "--base-url"), ("keyfile", "k.pem", "--certfile"),
    ("client_ca", "ca.pem", "--certfile"), ("comment_prefix", "python", "LANG=PREFIX"),
    ("max_body_size", 0, "--max-body-size"), ("warmup_concurrency", -1, "--warmup-concurrency"),
])
def test_bad_values_are_refused_with_the_flag_named(field: str, value: object,
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(**{field: value})


def test_credentials_need_explicit_origins() -> None:
    with pytest.raises(ConfigError, match="explicit origins"):
        settings(allow_origin="*", allow_credentials=True)
    assert settings(allow_origin="http://a, http://b").origins == {"http://a", "http://b"}


def test_derived_values() -> None:
    assert settings(base_url="/v1/").prefix == "/v1" and settings().prefix == ""
    assert settings(timeout=0).request_timeout is None
    assert settings(comment_prefix="python=##, r=#'").comment_prefixes == {
        "python": "##", "r": "#'"}
    assert settings(warmup_concurrency=3).warmup_limit == 3
    assert settings().warmup_limit >= 4


def test_kernels_never_inherit_a_secret() -> None:
    env = {"PATH": "/bin", **{name: "s3cret" for name in SECRET_ENV}}
    assert settings(kernel_env=env).kernel_env == {"PATH": "/bin"}


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError):
        settings().replace(kernels=0)


@pytest.mark.parametrize("text,size", [
    ("", 0), ("512", 512 * 2**20), ("512M", 512 * 2**20), ("1.5G", 3 * 2**29),
    ("2GiB", 2 * 2**30), ("300mb", 300 * 2**20), ("64k", 64 * 2**10), (" 1 T ", 2**40)])
def test_kernel_memory_sizes(text: str, size: int) -> None:
    assert settings(max_kernel_memory=text).kernel_memory_limit == size


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "1.5X", "G"])
def test_bad_kernel_memory_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--max-kernel-memory"):
        settings(max_kernel_memory=text)


def test_fork_needs_the_direct_channel() -> None:
    with pytest.raises(ConfigError, match="--fork serves through the direct channel"):
        settings(fork=True, channel="jupyter")
    assert settings(fork=True).fork
