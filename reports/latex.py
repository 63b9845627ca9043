"""LaTeX helpers: escaping, the report document, compiling it with pdflatex.

The report is plain LaTeX (article class) so a paper can ``\\input`` its
tables unchanged. The packages it needs are listed in ``REQUIRED_PACKAGES``; on
Debian/Ubuntu they come with ``apt-get install texlive-latex-base
texlive-latex-recommended`` (booktabs and caption are in the second).

Why a temporary directory: pdflatex writes its aux/log files beside the
output and leaves a truncated PDF when it fails. Compiling into a temporary
directory and moving the finished PDF with ``os.replace`` means the target is
either the previous complete PDF or the new complete one, never a broken file.
pdflatex runs twice so that cross-references and float numbers settle.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jinja2

REQUIRED_PACKAGES = ("booktabs", "graphicx", "geometry", "caption")
DEBIAN_PACKAGES = ("texlive-latex-base", "texlive-latex-recommended")
TEMPLATE_PATH = Path(__file__).with_name("report.tex")

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


class LatexError(RuntimeError):
    """pdflatex failed on a document simbench generated (a bug, not bad input)."""


def latex_escape(text: Any) -> str:
    """Escape the characters LaTeX treats specially, so any run name prints as is."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


def pdflatex_path() -> str | None:
    return shutil.which("pdflatex")


def standalone_document(body: str) -> str:
    """A minimal document around ``body`` with the report's preamble (used to test tables)."""
    return "\n".join([
        r"\documentclass[10pt]{article}",
        *[rf"\usepackage{{{name}}}" for name in REQUIRED_PACKAGES],
        r"\geometry{margin=2cm}",
        r"\begin{document}",
        body,
        r"\end{document}",
        "",
    ])


def compile_pdf(tex_path: str | Path, pdf_path: str | Path | None = None,
                timeout: float = 180.0, passes: int = 2) -> Path | None:
    """Compile ``tex_path`` with pdflatex; return the PDF path, or None without pdflatex.

    pdflatex runs in the directory of the .tex file, so relative ``\\input`` and
    ``\\includegraphics`` paths resolve there; aux files go to a temporary
    directory that is removed afterwards. Raises :class:`LatexError` with the
    tail of the log when pdflatex fails or exceeds ``timeout`` seconds.
    """
    tex_path = Path(tex_path).resolve()
    pdf_path = Path(pdf_path) if pdf_path is not None else tex_path.with_suffix(".pdf")
    exe = pdflatex_path()
    if exe is None:
        warnings.warn(
            f"pdflatex not found: wrote {tex_path.name} but skipped {pdf_path.name} "
            f"(install: apt-get install -y {' '.join(DEBIAN_PACKAGES)})",
            RuntimeWarning, stacklevel=2)
        return None
    workdir = tex_path.parent
    tmp = Path(tempfile.mkdtemp(prefix="latex-", dir=workdir))
    try:
        cmd = [exe, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape",
               f"-output-directory={tmp.name}", tex_path.name]
        for _ in range(passes):
            try:
                proc = subprocess.run(cmd, cwd=workdir, capture_output=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise LatexError(f"pdflatex exceeded {timeout:.0f} s on {tex_path}") from exc
            if proc.returncode != 0:
                log = tmp / (tex_path.stem + ".log")
                text = log.read_text(errors="replace") if log.exists() else proc.stdout.decode(errors="replace")
                tail = "\n".join(text.splitlines()[-25:])
                raise LatexError(f"pdflatex failed on {tex_path} (exit {proc.returncode}):\n{tail}")
        built = tmp / (tex_path.stem + ".pdf")
        if not built.exists() or built.stat().st_size == 0:
            raise LatexError(f"pdflatex produced no PDF for {tex_path}")
        pdf_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), str(pdf_path.with_name(f".{pdf_path.name}.tmp")))
        os.replace(pdf_path.with_name(f".{pdf_path.name}.tmp"), pdf_path)
        return pdf_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _template_environment(directory: Path) -> jinja2.Environment:
    # LaTeX uses { } % # freely; these delimiters never clash with it.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        block_start_string=r"\BLOCK{", block_end_string="}",
        variable_start_string=r"\VAR{", variable_end_string="}",
        comment_start_string=r"\#{", comment_end_string="}",
        line_comment_prefix="%%", trim_blocks=True, lstrip_blocks=True,
        autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )


def render_report(context: dict[str, Any], template_path: str | Path = TEMPLATE_PATH) -> str:
    """Fill the report template; ``context`` values are already LaTeX (escape text first)."""
    template_path = Path(template_path)
    env = _template_environment(template_path.parent)
    return env.get_template(template_path.name).render(packages=REQUIRED_PACKAGES, **context)
