"""``python -m lft_core <command>``: argument parsing, output paths and errors; the commands are ``commands``.

Each command prints progress to stderr, a readable summary to stdout, and with ``--json PATH`` writes its
results as JSON. Bad input ends with one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
import time

from lft_core.data.corpus import DEFAULT as DEFAULT_CORPUS
from lft_core.errors import LFTError
from lft_core.flow.config import MAX_SEED, TrainConfig
from lft_core.model.loading import DEVICE_MAPS
from lft_core.outputs import check_output_file
from lft_core.run.commands import COMMANDS, write_result
from lft_core.span import Span


def check_output_path(path: str | None, flag: str = "--json") -> None:
    """LFTError at once (before any work) unless ``path`` (when given) may be written: the one gate every output
    goes through, ``outputs.check_output_file`` (a regular file or a new name in an existing, writable folder,
    outside the cache; never a FIFO, device, socket, link or folder). An empty name is refused, not ignored."""
    if path is None:
        return
    check_output_file(path, flag)


MAX_PAIRS = 4096  # a 4096² float64 cost matrix is 128 MiB, and the exact assignment is cubic in it


def _pairs(text: str) -> int:
    v = _positive(text)
    if v > MAX_PAIRS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PAIRS} pairs (memory and time grow with pairs²), got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2**63 - 1, got {v}")
    return v


def _span(text: str) -> Span:
    try:
        return Span.parse(text)
    except LFTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str, allow_empty: bool = False) -> list[int]:
    """``"1, 2,3"`` -> [1, 2, 3]; at least one value unless ``allow_empty`` (``''`` is then no values)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values and not allow_empty:
        raise argparse.ArgumentTypeError(f"expected at least one integer (a comma list like 1,2,3), got {text!r}")
    return values


def _int_list_or_none(text: str) -> list[int]:
    """``--skip ''``: no skip-k rows (eval still evaluates the flow; ``baselines`` refuses it with the skip
    baseline chosen)."""
    return _int_list(text, allow_empty=True)


def _float(text: str) -> float:
    """A finite number (``nan``, ``inf`` and ``1e999`` are refused here; ranges are ``TrainConfig.validate``'s)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v + 0.0  # -0 is 0


def _baseline_list(text: str) -> list[str]:
    from lft_core.analysis.baselines import parse_names

    try:
        return parse_names(text)
    except LFTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_config_arguments(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a settings dataclass (``training.setting``): ``--seq-len`` for ``seq_len``, help,
    default, type and choices from the field, ``--x/--no-x`` for booleans. The settings are spelt once."""
    for f in (f for f in dataclasses.fields(config) if f.name not in skip):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kw: dict = {"help": meta.get("help"), "default": f.default}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, Span):
            kw.update(type=_span, required=meta.get("required", False))
            del kw["default"]
        else:
            kind = meta.get("type", type(f.default))
            kw["type"] = _positive if meta.get("positive") else _float if kind is float else kind
            if "choices" in meta:  # a registry's names are read when the parser is built
                choices = meta["choices"]
                kw["choices"] = list(choices() if callable(choices) else choices)
        parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; the method and baseline choices are the registries' names now."""
    from lft_core.analysis.baselines import BASELINES
    from lft_core.flow.methods import METHODS

    p = argparse.ArgumentParser(prog="python -m lft_core", description="LFT Explorer engine (Latent Flow Transformers)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, corpus: bool = True) -> None:
        sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a folder")
        if corpus:
            sp.add_argument("--corpus", default=DEFAULT_CORPUS,
                            help="mix (default: the broad human-written mixture), mix:PART, english, builtin "
                                 "(Python docs), a .txt/.jsonl file or folder, hf:NAME")
        sp.add_argument("--json", metavar="PATH", help="write the results as JSON here")
        sp.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
        placement(sp)

    def placement(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default=None, help="where the teacher runs: cpu, cuda, cuda:N (default: cpu; "
                                                       "under torchrun each rank's own GPU when there are GPUs)")
        sp.add_argument("--device-map", choices=list(DEVICE_MAPS), default=None,
                        help="spread a teacher too big for one device over GPUs, CPU and disk (Accelerate)")
        sp.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")

    c = sub.add_parser("cache", help="cache hidden states of a model over a corpus")
    common(c)
    c.add_argument("--seq-len", type=_positive, default=128)
    c.add_argument("--windows", type=_positive, default=64)
    c.add_argument("--layers", default="all", help="all, a:b or 0,6,12")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.add_argument("--batch-size", type=_positive, default=8)

    t = sub.add_parser("train", help="train a latent flow replacing a span")
    add_config_arguments(t, TrainConfig)
    t.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    t.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
    t.add_argument("--resume", action="store_true", help="continue from the flow's last checkpoint (any number of ranks)")
    placement(t)
    t.add_argument("--progress-file", help=argparse.SUPPRESS)
    t.add_argument("--stop-file", help=argparse.SUPPRESS)

    w = sub.add_parser("sweep", help="train the grid spans x methods x k x seeds, one flow after another "
                                     "(resumable: run it again to continue)")
    w.add_argument("--spans", required=True, help="comma list of spans, e.g. 6:12,12:18")
    w.add_argument("--methods", default="fw", help=f"comma list of methods: {', '.join(METHODS)} (default fw)")
    w.add_argument("--k", default="3", help="comma list of integration steps, e.g. 1,3 (default 3)")
    w.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2 (default 0)")
    w.add_argument("--name", default=None, metavar="PREFIX",
                   help="sweep name; flows are PREFIX-M-N-METHOD-kK-sSEED (default: from the model and steps)")
    add_config_arguments(w, TrainConfig, skip=("span", "method", "k", "seed", "name", "sweep"))
    w.add_argument("--json", metavar="PATH", help="write the runs (name, span, method, k, seed, status, final "
                                                  "loss, held-out NMSE, seconds) as JSON here")
    w.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run")
    placement(w)
    w.add_argument("--progress-file", help=argparse.SUPPRESS)
    w.add_argument("--stop-file", help=argparse.SUPPRESS)

    c = sub.add_parser("compare", help="the Compare page's evaluation of saved flows against skip-k (at every "
                                       "position) and fitted baselines, saved under cache/evaluations and reused; "
                                       "--skip-only: only the skip-k grid (saved under cache/grids)")
    c.add_argument("--flows", default="", help="comma list of saved flow names (empty with --skip-only)")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--corpus", default=DEFAULT_CORPUS, help="the held-out text's corpus")
    c.add_argument("--windows", type=_positive, default=4, help="held-out windows")
    c.add_argument("--seq-len", type=_positive, default=128, help="tokens per window")
    c.add_argument("--skip-max", type=_positive, default=3, help="skip-k for k = 1 .. this")
    c.add_argument("--no-best", dest="best", action="store_false",
                   help="skip-k only in the flows' spans, not at every position")
    c.add_argument("--baselines", default="", help="comma list of fitted baselines (affine)")
    c.add_argument("--skip-only", action="store_true", help="only the skip-k grid at every position")
    c.add_argument("--json", metavar="PATH")
    c.add_argument("--progress-file", help=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="KL / NMSE / PPL of a flow against the teacher and layer skipping")
    e.add_argument("--flow", required=True, help="a saved flow's name (cache/flows/NAME), or a folder given as a "
                                                 "path (with a /, or starting with . or ~)")
    e.add_argument("--model", default=None, help="defaults to the flow's model")
    e.add_argument("--text", help="evaluate on this text file instead of held-out corpus windows")
    e.add_argument("--corpus", default=None, help="held-out windows of this corpus (default: the flow's own)")
    e.add_argument("--domains", default=None,
                   help="evaluate on several corpora and print one KL table: a comma list of corpus specs, or "
                        "'all' = every part of the mixture (mix:PART) and the Debian licences")
    e.add_argument("--windows", type=_positive, default=16)
    e.add_argument("--seq-len", type=_positive, default=None)
    e.add_argument("--k", type=_int_list, default=[1, 2, 3], help="LFT integration steps, e.g. 1,2,3")
    e.add_argument("--skip", type=_int_list_or_none, default=[1, 2, 3],
                   help="skip-k baselines, e.g. 1,2,3 ('' for none)")
    e.add_argument("--baselines", type=_baseline_list, default=[],
                   help=f"baselines to add beside skip-k (--skip), comma list of {', '.join(BASELINES)} (fitted "
                        "ones on the flow's training data)")
    e.add_argument("--json", metavar="PATH")
    placement(e)

    a_ = sub.add_parser("baselines", help="what-if baselines without training: skip-k and the closed-form affine "
                                          "replacement of one span, or the affine grid of every span")
    common(a_)
    a_.add_argument("--span", type=_span, default=None, help="M:N: skip-k and affine rows for this span")
    a_.add_argument("--spans", default=None, help="all or M:N,M:N: the affine held-out NMSE grid")
    a_.add_argument("--skip", type=_int_list_or_none, default=[1, 2, 3],
                    help="skip-k baselines, e.g. 1,2,3 ('' only with --baselines leaving skip out)")
    a_.add_argument("--baselines", type=_baseline_list, default=[],
                    help=f"--span: comma list of {', '.join(BASELINES)} (default: every one)")
    a_.add_argument("--text", help="evaluate on this text file instead of held-out corpus windows")
    a_.add_argument("--windows", type=_positive, default=16, help="held-out windows to evaluate on")
    a_.add_argument("--seq-len", type=_positive, default=128)
    a_.add_argument("--fit-windows", type=_positive, default=256, help="training windows the affine map is fitted on")
    a_.add_argument("--heldout-windows", type=_positive, default=16, help="held-out windows that choose the ridge")
    a_.add_argument("--sink-weight", type=float, default=None,
                    help="weight of each window's first token in the fit (default: seq_len / 2, the flows' rule)")
    a_.add_argument("--fit-only", action="store_true",
                    help="--span: fit the fitted baselines (kept in cache/baselines for every later use), evaluate "
                         "nothing")
    a_.add_argument("--grid-windows", type=_positive, default=16,
                    help="--spans: training windows of the all-layer cache (the recoupling grid's)")
    a_.add_argument("--grid-heldout-windows", type=_positive, default=4, help="--spans: held-out windows scored")

    r = sub.add_parser("recoupling", help="recoupling ratio of every span (optimal transport vs true pairing)")
    common(r)
    r.add_argument("--pairs", type=_pairs, default=512,
                   help=f"token pairs sampled per span (at most {MAX_PAIRS}: the cost matrix is pairs² float64)")
    r.add_argument("--spans", default="all", help="all or M:N,M:N")
    r.add_argument("--seq-len", type=_positive, default=128)
    r.add_argument("--windows", type=_positive, default=16)
    r.add_argument("--include-first", action="store_true", help="keep position 0 (attention sinks)")
    r.add_argument("--seed", type=_seed, default=0)

    y = sub.add_parser("toy", help="2-D teaching lab: SFM vs Flow Walking on paired point clouds")
    y.add_argument("--dataset", default="mirror", help="mirror, rotation, swap or identity")
    y.add_argument("--method", choices=list(METHODS), default="fw")
    y.add_argument("--steps", type=_positive, default=1500)
    y.add_argument("--k", type=_positive, default=3)
    y.add_argument("--points", type=_positive, default=256)
    y.add_argument("--seed", type=_seed, default=0)
    y.add_argument("--json", metavar="PATH")

    f = sub.add_parser("flows", help="list the saved flows (shipped or trained here), the shipped ones, copy or "
                                     "delete one")
    f.add_argument("--delete", metavar="NAME", help="delete this flow (refused while a job trains it)")
    f.add_argument("--shipped", action="store_true", help="list the flows shipped with the project (the zoo)")
    f.add_argument("--copy", metavar="SRC", help="copy a saved flow (a shipped one too) under the name given by --to, "
                                                 "with a fresh optimiser state, to train it further with --resume")
    f.add_argument("--to", metavar="NEW", help="the new name of --copy")
    f.add_argument("--json", metavar="PATH")

    b = sub.add_parser("bench", help="benchmarks (see docs/BENCHMARKS.md)")
    b.add_argument("--what", default="cache,train,recoupling,umap",
                   help="comma list of benchmarks: cache, train, recoupling, umap, baselines")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--json", metavar="PATH")

    d = sub.add_parser("demo", help="build everything the pages need for a ready-made story: the all-layer cache, "
                                    "the recoupling and affine grids, and SFM and FW flows on a low-R and a high-R "
                                    "span (idempotent: a second run does nothing; resumable after a kill)")
    d.add_argument("--status", action="store_true", help="only say how far the demo of these settings is")
    d.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a folder")
    d.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="mix (default), english, builtin, a .txt/.jsonl file or folder")
    d.add_argument("--seq-len", type=_positive, default=128, help="tokens per window (the cache's and the flows')")
    d.add_argument("--windows", type=_positive, default=16, help="windows of the all-layer cache the grids use")
    d.add_argument("--pairs", type=_pairs, default=256, help="token pairs per span of the recoupling grid")
    d.add_argument("--blocks", type=_positive, default=6, help="blocks in each of the two demo spans")
    d.add_argument("--steps", type=_positive, default=None, help="flow steps per flow (default: the recipe's)")
    d.add_argument("--distill-steps", type=int, default=None,
                   help="distillation steps per flow (default: the recipe's)")
    d.add_argument("--train-windows", type=_positive, default=None,
                   help="training windows per flow (default: the recipe's)")
    d.add_argument("--heldout-windows", type=_positive, default=None,
                   help="held-out windows per flow (default: the recipe's)")
    d.add_argument("--batch", type=_positive, default=None, help="windows per training step (default: the recipe's)")
    d.add_argument("--json", metavar="PATH", help="write the result (steps with state and seconds, spans, flows) here")
    d.add_argument("--progress-file", help=argparse.SUPPRESS)
    d.add_argument("--stop-file", help=argparse.SUPPRESS)
    return p


DISTRIBUTED_COMMANDS = ("cache", "train")
"""Commands that run under torchrun (``torchrun --nproc-per-node N -m lft_core <command> ...``)."""


def main(argv: list[str] | None = None) -> int:
    from lft_core import distributed

    parser = build_parser()
    place = distributed.env_rank()  # (rank, world) under torchrun
    if place is None or place[1] < 2:
        args = parser.parse_args(argv)
    else:  # under torchrun every rank parses the same line: rank 0 says what is wrong with it, once
        held, sys.stderr = sys.stderr, io.StringIO()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            said, sys.stderr = sys.stderr.getvalue(), held
            if e.code:
                distributed.before_error()
                distributed.record_error(said.strip().splitlines()[-1] if said.strip() else "error")
            sys.stderr.write(said)
            sys.stderr.flush()
            raise
        finally:
            sys.stderr = held
    if args.command == "eval":
        args.corpus_given = args.corpus is not None
    start = time.perf_counter()
    dist = distributed.current()
    quiet = None
    try:
        if distributed.launched_by_torchrun():
            dist = distributed.init_from_env()
            if dist.active and args.command not in DISTRIBUTED_COMMANDS:
                raise LFTError(f"`{args.command}` runs in one process; under torchrun only "
                               f"{' and '.join(DISTRIBUTED_COMMANDS)} do (start it with python -m lft_core)")
        if not dist.main:  # every rank's results equal rank 0's, which alone prints and writes them
            quiet, sys.stdout = sys.stdout, open(os.devnull, "w")
        if dist.main:
            check_output_path(getattr(args, "json", None))  # before any work: an hour of evaluation is never lost
        result = COMMANDS[args.command](args)
        result.setdefault("wall_seconds", round(time.perf_counter() - start, 3))
        if dist.main:
            write_result(getattr(args, "json", None), result)
    except LFTError as e:
        return _fail(dist, f"error: {e}", 2)
    except OSError as e:  # the machine said no (a full disk, a read-only folder, a vanished file): one line
        where = f" ({e.filename})" if e.filename else ""
        return _fail(dist, f"error: {e.strerror or e}{where}", 2)
    except KeyboardInterrupt:
        print(f"{_who(dist)}error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not (dist.active and distributed.lost_a_peer(e)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split("] ", 1)[-1][:160]  # drop the C++ source location gloo puts first
        return _fail(dist, f"error: another rank of this run stopped ({first}); every rank ends here, and what "
                           f"was last saved (checkpoint, cache entry) is intact", 1, hold_back=False)
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        distributed.shutdown()
    return 0


def _who(dist) -> str:
    """Error lines of ranks other than 0 say which rank speaks (known from torchrun's environment even before
    the process group is joined)."""
    from lft_core import distributed

    if not dist.main:
        return f"rank {dist.rank}: "
    where = distributed.env_rank()
    return f"rank {where[0]}: " if where is not None and where[0] != 0 else ""


def _fail(dist, line: str, status: int, hold_back: bool = True) -> int:
    """Print ``line`` (prefixed by the rank when not 0) as the last stderr line and return ``status``. Under
    torchrun the line also goes to the agent's error file, and a rank other than 0 holds it back a few seconds
    so that an error every rank meets is said once, by rank 0 (``distributed.before_error``)."""
    from lft_core import distributed

    if hold_back:
        distributed.before_error()
    line = _who(dist) + line
    print(line, file=sys.stderr, flush=True)
    distributed.record_error(line)
    return status
