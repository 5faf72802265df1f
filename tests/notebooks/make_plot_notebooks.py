"""Writes the matplotlib test notebooks (tests/test_plots.py) in this folder; run it after
editing. Each endpoint is one recipe of README's "Answering with a plot"."""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def write(name: str, cells: list[str]) -> None:
    """As make_notebooks.write (which runs all of its writes when imported)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "python3",
                                  "language": "python"}, "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("MD:")
                else nbformat.v4.new_code_cell(c) for c in cells]
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{index}"  # stable ids: rewriting changes nothing
    nbformat.write(nb, HERE / f"{name}.ipynb")

AGG = [
    "MD:# Plots under the Agg backend\nEvery way a cell can answer with a figure.",
    "import base64, io, json\n"
    "import matplotlib\n"
    "matplotlib.use('Agg')\n"
    "import matplotlib.pyplot as plt\n"
    "from IPython.display import Image, display\n"
    "\n"
    "def line_plot(width, height):\n"
    "    fig, ax = plt.subplots(figsize=(width, height), dpi=100)\n"
    "    ax.plot([1, 2, 3], [1, 4, 9])\n"
    "    return fig\n"
    "\n"
    "def png_bytes(fig):\n"
    "    data = io.BytesIO()\n"
    "    fig.savefig(data, format='png')\n"
    "    return data.getvalue()",
    "# GET /figure\nfig = line_plot(4, 3)\nplt.close(fig)\nfig",
    "# GET /figure-object\nfrom matplotlib.figure import Figure\n"
    "fig = Figure(figsize=(2, 1), dpi=100)\nfig.add_subplot().plot([1, 2])\nfig",
    "# GET /show\nline_plot(3, 2)\nplt.show()",
    "# GET /show-two\nline_plot(3, 2)\nline_plot(2, 2)\nplt.show()",
    "# GET /open-figures\nprint(len(plt.get_fignums()), end='')",
    "# GET /display\nfig = line_plot(2, 1)\nplt.close(fig)\ndisplay(fig)",
    "# GET /display-image\nfig = line_plot(1, 1)\nplt.close(fig)\ndisplay(Image(png_bytes(fig)))",
    "# GET /bytes\nfig = line_plot(1, 2)\nplt.close(fig)\npng_bytes(fig)",
    "# ResponseInfo GET /bytes\nprint(json.dumps({'headers': {'Content-Type': 'image/png'}}))",
    "# GET /base64\nfig = line_plot(1, 2)\nplt.close(fig)\n"
    "print(base64.b64encode(png_bytes(fig)).decode())",
    "# ResponseInfo GET /base64\nprint(json.dumps({'headers': {'Content-Type': 'image/png'}}))",
    "# GET /empty\nfig = plt.figure()\nplt.close(fig)\nfig",
    "# GET /svg-backend\nplt.switch_backend('svg')\ntry:\n    line_plot(1, 2)\n    plt.show()\n"
    "finally:\n    plt.switch_backend('agg')",
]

INLINE = [
    "MD:# Plots under the inline backend (ipykernel's default)",
    "import matplotlib.pyplot as plt\n"
    "# figures exactly figsize x dpi, not cropped to their content\n"
    "get_ipython().run_line_magic('config', "
    "\"InlineBackend.print_figure_kwargs = {'bbox_inches': None}\")",
    "# GET /figure\nfig, ax = plt.subplots(figsize=(4, 3), dpi=100)\nax.plot([1, 2])\n"
    "plt.close(fig)\nfig",
    "# GET /backend\nimport matplotlib\nprint(matplotlib.get_backend(), end='')",
]

WITHOUT = [
    "MD:# No matplotlib here",
    "import json, sys",
    "# GET /modules\nprint(json.dumps(sorted(name for name in sys.modules\n"
    "                        if name.split('.')[0] in ('matplotlib', 'PIL'))), end='')",
]

if __name__ == "__main__":
    write("plots_agg", AGG)
    write("plots_inline", INLINE)
    write("plots_none", WITHOUT)
