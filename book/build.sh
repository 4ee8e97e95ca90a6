#!/usr/bin/env bash
# Builds the book into book/_build/html (open book/_build/html/index.html), warnings as errors.
# Uses the project's .venv (made by ./setup.sh when missing) with book/requirements.txt added.
# Extra arguments go to jupyter-book, e.g. `book/build.sh --all` (rebuild every page) or
# `book/build.sh --builder latex` (book/_build/latex/tarflow_ref.tex; `--builder pdflatex` where
# TeX is installed). The book executes nothing: notebooks appear with their stored outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./setup.sh
.venv/bin/pip install -q --disable-pip-version-check -r book/requirements.txt
exec .venv/bin/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book -W "$@"
