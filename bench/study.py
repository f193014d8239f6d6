"""The command line the bench/ studies share: a grid of pipeline runs, in this process.

Every study here (heads, initialisation, SHIP, DePT) is a grid of variants x protocols x
seeds run by stages/grid.py, the machinery the Prefect study flow (flows/study.py) uses
too. Here the runs go one after another in this process, with no MLflow or Prefect: what
a device machine without them, or a quick look on a laptop, needs. The fidelity study
(issue 10) runs through the product's flow instead: `python flows/study.py
configs/studies/fidelity.yaml`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # stages/ is a sibling package of src/

from stages.grid import (  # noqa: E402,F401  (re-exported for the study scripts)
    Variant,
    device_name,
    prepare_protocol,
    protocol_params,
    run_study,
    run_variant,
    save,
)
from stages.grid import PROTOCOLS  # noqa: E402


def study_cli(
    name: str,
    variants: list[Variant],
    doc: str,
    probe_first_epoch: bool = False,
    columns: dict[str, str] | None = None,
) -> None:
    """The command line every study shares: protocols, seeds, data root, work and results folders."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", action="append", choices=list(PROTOCOLS),
                        help="protocol(s) to run (repeatable; default: digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data folder for fashion_mnist (sets data.root and backbone.pretrain.root)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work",
                        help="run folders: <protocol>/shared (the pretrained backbone and features, shared by every "
                        "study run here) and <protocol>/<study>/<variant>/seed<N>; finished runs are not run again")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--progress", action="store_true", help="show the stages' progress bars")
    args = parser.parse_args()
    protocols = {name: protocol_params(PROTOCOLS[name], args.data_root) for name in args.protocol or ["digits"]}
    study = run_study(name, variants, protocols, args.seeds, args.work, args.progress, probe_first_epoch, args.out,
                      columns)
    table, _ = save(study, args.out, columns)
    print(table)
