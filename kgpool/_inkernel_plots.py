"""Runs inside every Python kernel (sent as source at warm-up, never imported by kgpool itself).

matplotlib figures answer as images whatever the backend. A cell whose value is a Figure (or
that displays one) gets an image/png representation, as under the inline backend, also under
Agg and the other non-GUI backends (svg, pdf, ps, cairo...), where IPython has none: the
formatter is registered by the class's name, so nothing imports matplotlib for it. Under those
backends `plt.show()`, which does nothing there, displays every open figure and closes them,
as the inline backend does; under the inline backend (or a GUI one) it is matplotlib's own.
The inline backend's own formatter, once it is active, takes precedence (with its settings,
e.g. InlineBackend.print_figure_kwargs). The source is run in a namespace of its own: these
names never reach the user's globals.
"""

import functools
import io
import sys

# matplotlib's built-in backends that draw to files only: plt.show() cannot show anything there
_NON_GUI = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})
_PYPLOT = "matplotlib.pyplot"


def _png(figure):
    """The figure as PNG bytes (savefig's defaults and rcParams); None for a figure with
    nothing in it, as IPython's inline formatter gives."""
    if not figure.axes and not figure.lines:
        return None
    data = io.BytesIO()
    figure.savefig(data, format="png")
    return data.getvalue()


def _showing(pyplot):
    """pyplot.show that displays the open figures under a non-GUI backend."""
    original = pyplot.show

    @functools.wraps(original)
    def show(*args, **kwargs):
        if str(pyplot.get_backend()).lower() not in _NON_GUI:
            return original(*args, **kwargs)
        from IPython.display import display
        try:
            for number in pyplot.get_fignums():
                display(pyplot.figure(number))
        finally:
            pyplot.close("all")
        return None

    show.kgpool_original = original
    return show


class _PyplotImport:
    """A one-shot import hook: once matplotlib.pyplot has run, its show is replaced."""

    def find_spec(self, name, path=None, target=None):
        if name != _PYPLOT:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module):
            run(module)
            module.show = _showing(module)

        loader.exec_module = exec_module
        return spec

    def invalidate_caches(self):
        pass


def _kgpool_plots_install():
    shell = get_ipython()  # noqa: F821  (a kernel global)
    png = shell.display_formatter.formatters["image/png"]
    png.for_type_by_name("matplotlib.figure", "Figure", _png)
    pyplot = sys.modules.get(_PYPLOT)
    if pyplot is not None:
        pyplot.show = _showing(pyplot)
    else:
        sys.meta_path.insert(0, _PyplotImport())
