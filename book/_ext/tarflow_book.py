"""Sphinx extension of the tarflow_ref book: the TeX macros of its pages, in one place.

MathJax (the HTML build) and LaTeX (the PDF build) each need the macros defined in their own
syntax; this writes both from one table, so a page can use `\\R` in either route.
"""

MACROS = {
    "R": r"\mathbb{R}",
}


def add_macros(app, config):
    mathjax = dict(config.mathjax3_config or {})
    tex = dict(mathjax.get("tex", {}))
    tex["macros"] = {**tex.get("macros", {}), **MACROS}
    mathjax["tex"] = tex
    config.mathjax3_config = mathjax
    latex = dict(config.latex_elements or {})
    definitions = "".join(rf"\providecommand{{\{name}}}{{{body}}}" + "\n" for name, body in MACROS.items())
    latex["preamble"] = latex.get("preamble", "") + "\n" + definitions
    config.latex_elements = latex


def setup(app):
    app.connect("config-inited", add_macros, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
