"""Build an HTML template for `dvc plots show` that renders offline (`make plots` runs this).

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so its JSON plots stay blank
without network. This fetches the same three packages from the npm registry once (`npm pack`, into
npm/ next to this file, checked against the sha512 integrity pinned below), and writes
template.html with their browser builds inline. The template has no `{scripts}` placeholder, so DVC
adds no CDN <script> tag to it. Use it with

    dvc plots show --html-template .dvc/plots-offline/template.html
    dvc config --local plots.html_template plots-offline/template.html   # or once (relative to .dvc/)

npm/ and template.html are git-ignored (6 MB of tarballs, a 0.8 MB page); the script needs only
Python's standard library, and npm only when a tarball is missing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The versions dvc-render's VegaRenderer.SCRIPTS loads (dvc 3.67.1, dvc-render 1.0.2): the vega-lite
# specs DVC's plot templates produce are written for them. npm's integrity of each tarball (`npm view
# NAME@VERSION dist.integrity`). All three are BSD-3-Clause.
PACKAGES = {
    "vega": ("5.20.2", "build/vega.min.js",
             "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0", "build/vega-lite.min.js",
                  "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2", "build/vega-embed.min.js",
                   "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}

# DVC's default page (dvc_render.html.PAGE_HTML) with the scripts inline instead of `{scripts}`.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- offline: @SUMMARY@ inline, built by .dvc/plots-offline/build_template.py (make plots) -->
@SCRIPTS@
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""

# Strings DVC replaces in a template (dvc_render.html.HTML.embed): none may occur in the inlined code.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")


class BuildError(Exception):
    pass


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def tarball(name: str, npm_dir: Path) -> Path:
    """NAME's pinned tarball in npm_dir, fetched with `npm pack` when missing or not the pinned bytes."""
    version, _, expected = PACKAGES[name]
    path = npm_dir / f"{name}-{version}.tgz"
    if not (path.is_file() and integrity(path.read_bytes()) == expected):
        npm = shutil.which("npm")
        if npm is None:
            raise BuildError(f"{path} is missing and npm is not installed (apt-get install npm)")
        npm_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "pack", "--silent", f"{name}@{version}", "--pack-destination", str(npm_dir)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise BuildError(f"npm pack {name}@{version} failed:\n{proc.stdout}{proc.stderr}")
        if integrity(path.read_bytes()) != expected:
            path.unlink()
            raise BuildError(f"{name}@{version} from the registry does not match the pinned integrity")
    return path


def script(name: str, npm_dir: Path) -> str:
    version, member, _ = PACKAGES[name]
    with tarfile.open(tarball(name, npm_dir)) as tar:
        code = tar.extractfile(f"package/{member}").read().decode("utf-8")
    # a source map is fetched only by developer tools, and is not in the page: drop the reference
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    for forbidden in ("</script", "<!--", *PLACEHOLDERS):
        if forbidden in code.lower():
            raise BuildError(f"{name}@{version}'s {member} contains {forbidden!r}: it cannot be inlined as is")
    return f"    <!-- {name}@{version} {member} (BSD-3-Clause) -->\n    <script>\n{code}\n    </script>"


def build(npm_dir: Path, out: Path) -> Path:
    summary = ", ".join(f"{name}@{version}" for name, (version, _, _) in PACKAGES.items())
    scripts = "\n".join(script(name, npm_dir) for name in PACKAGES)
    page = PAGE.replace("@SUMMARY@", summary).replace("@SCRIPTS@", scripts)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(out)  # never a half-written template
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npm-dir", type=Path, default=HERE / "npm", help="where the npm tarballs are kept")
    parser.add_argument("--out", type=Path, default=HERE / "template.html", help="the template to write")
    args = parser.parse_args(argv)
    try:
        out = build(args.npm_dir, args.out)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{out} (dvc plots show --html-template {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
