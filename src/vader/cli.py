"""`vader train | infer | run | config` — parse, call, turn user errors into exit status 2.

    vader train CONFIG [--key value ...]     train a LoRA (also: accelerate launch -m vader train ...)
    vader infer CONFIG [--key value ...]     generate videos, optionally with lora_ckpt_path
    vader run CONFIG [--key value ...]       the original script's behaviour: follows is_vader_training
    vader config CONFIG [--key value ...]    print the resolved, validated config (loads no model)
    vader inspect CONFIG [--part P] [--keys] parameter counts / LoRA targets / key listing, on meta
    vader plan CONFIG [--budget 24GiB] [--fit] peak GPU memory, what holds it, FLOPs; the knobs that fit
    vader bench CONFIG                       the real training step beside its plan (memory, time, card)
    vader score --reward NAME [--prompt TEXT | --prompts FILE] VIDEO...   score mp4 files, print a table
    vader eval CONFIG --lora PATH [--prompts F] [--rewards a,b] [--seeds N]   base vs LoRA, same prompts/seeds

Overrides use the config's key names (`--lr 1e-4`, `--scheduler.num_sampling_steps 10`) and accept
Open-Sora's hyphenated flags (`--num-frames 2s --resolution 240p --aspect-ratio 3:4 --prompt-path F`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator

from vader.errors import ArgumentParser, VaderError
from vader.weights import quiet_loading_bars

COMMANDS = {
    "train": "train a LoRA by backpropagating the reward through the sampler",
    "infer": "generate videos (with an optional LoRA: --lora_ckpt_path PATH)",
    "run": "train or infer as the config's is_vader_training says (drop-in for the original script)",
    "config": "print the validated config as JSON, with a 'resolved' block (frames, sizes, latent shape, steps), "
              "without loading any model",
    "score": "score existing mp4 files with any reward: vader score --reward NAME --prompt TEXT VIDEO...",
    "eval": "base vs LoRA on the same prompts and seeds, with 95%% intervals, win rate and reward-hacking guards: "
            "vader eval CONFIG --lora PATH [--seeds N]",
    "inspect": "parameter counts, LoRA targets and (--keys) state-dict keys, from the meta device (no download)",
    "plan": "peak memory of a training step and an inference batch at full size (fake tensors: no weights, no "
            "GPU), what holds it, FLOPs and step time; --fit finds the knobs that fit --budget",
    "bench": "run two real training steps and print the second's peak memory and time beside the plan "
             "(torch.cuda.max_memory_allocated and the card on a GPU)",
}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vader",
        description="VADER: align text-to-video diffusion models (Open-Sora v1.2) to reward models.",
        epilog="Quick start: vader train configs/tiny/vader_train.py",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name in ("score", "eval"):  # their own arguments (videos; --lora/--seeds), parsed by their modules
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text + ".\n\n" + _OVERRIDE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="Python config file, e.g. configs/opensora-v1-2/vader/vader_train.py")
        if name == "config":
            p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
        if name == "inspect":
            p.add_argument("--part", choices=["denoiser", "vae", "text_encoder"], help="only this model")
            p.add_argument("--keys", action="store_true", help="print every state-dict key<TAB>shape")
        if name == "plan":
            # '--budget -1GiB', '--mfu -inf' reach their flags (and their one-line range messages) instead
            # of argparse's "expected one argument": '-' and a number is a value, as argparse treats '-1'
            p._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)
            p.add_argument("--budget", help="GPU memory to fit, from 1MiB to 1024TiB, e.g. 24GiB or 800MiB (GB and a "
                                            "bare number mean GiB)")
            p.add_argument("--fit", action="store_true", help="find the fastest knob settings within --budget; "
                                                              "exit status 2 when none fits")
            p.add_argument("--gpu", help="card for the step-time estimate (any case): H200, H100 (default), A100, "
                                         "L40S, A6000, RTX4090, A10G, V100; not with --tflops")
            p.add_argument("--tflops", type=float, help="for a card not in --gpu's list: its dense bf16 TFLOP/s "
                                                        "(0.001 to 1e6; printed as 'custom'); not with --gpu")
            p.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation for the estimate "
                                                                   "(0.001 to 1, default 0.35)")
            p.add_argument("--all-steps", action="store_true", dest="all_steps",
                           help="run every sampling step (default: one no-gradient step, FLOPs multiplied)")
            p.add_argument("--num_processes", "--num-processes", type=int, default=1, dest="num_processes",
                           help="processes (GPUs) the run trains on, 1 to 65536 (default 1): memory per process "
                                "and the all-gather / all-reduce traffic; with --sharding fsdp the frozen denoiser "
                                "is split over them")
    return parser


_OVERRIDE_HELP = (
    "Any config key can follow as an override: --lr 1e-4, --reward_fn colorfulness,\n"
    "--scheduler.num_sampling_steps 10, --model.from_pretrained /path/to/STDiT3, and Open-Sora's\n"
    "flags --num-frames 2s --resolution 240p --aspect-ratio 3:4 --prompt-path prompts.txt."
)


class Terminated(SystemExit):
    """SIGTERM during train/infer/run, raised where the program is: the run's failure path cleans up as
    for any exception (a folder with nothing of value goes), then the exit status is 143 (128 + 15)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "score":  # its own arguments: videos and prompts, not a config file
            from vader.score import score_main

            quiet_loading_bars()
            return score_main(argv[1:])
        if argv and argv[0] == "eval":  # its own arguments: --lora, --prompts, --rewards, --seeds, then overrides
            from vader.evaluate import eval_main

            quiet_loading_bars()
            return eval_main(argv[1:])
        parser = _parser()
        known, overrides = parser.parse_known_args(argv)
        if "-h" in overrides or "--help" in overrides:
            parser.parse_args(argv)
        if known.command is None and argv:
            raise VaderError(f"{argv[0]!r} is not a command; choose one of: {', '.join(COMMANDS)} (see vader --help)")
        if known.command is None:
            parser.print_help()
            return 2
        code = _dispatch(known, overrides)
        sys.stdout.flush()  # a closed pipe must fail here, where it is handled, not at interpreter exit
        return code
    except VaderError as exc:
        _close_progress_bars()
        print(f"vader: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        _close_progress_bars()
        print("vader: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        _close_progress_bars()
        print("vader: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`vader inspect ... | head`): stop quietly, as cat and ls do. Python
        # flushes stdout again at exit, so point it at devnull to keep that flush from failing too.
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def one_line(exc: BaseException) -> str:
    """The message on one line, whatever the raiser wrote (a list of problems becomes one sentence)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _close_progress_bars() -> None:
    """Close every live tqdm bar (it ends its line) so that the message printed next starts a line of
    its own and no bar is redrawn after it. The run's failure path already closed its own bar; this
    catches any other (a library's) that an error interrupted."""
    std = sys.modules.get("tqdm.std")  # no tqdm imported: no bar
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
    with contextlib.suppress(Exception):
        sys.stderr.flush()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (exit status 143) in the main thread, so a run
    killed by `kill`, a job scheduler or a container stop goes through the same cleanup as an error;
    a second SIGTERM during that cleanup kills at once (the previous handler is back). The previous
    handler is restored on leaving. Outside the main thread (signals cannot be caught there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured in tests)
        pass


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> int:
    from vader.config import load_config, load_config_file

    if args.command == "config" and getattr(args, "keys", False):
        from vader.config import describe_keys

        load_config_file(args.config)  # the key table is only printed for a config that exists and reads
        for key, default, doc in describe_keys():
            print(f"{key:34s} {default:32s} {doc}")
        return 0
    if args.command == "bench":
        from vader.plan import bench_main

        quiet_loading_bars()
        print(bench_main(args.config, overrides))
        return 0
    if args.command == "plan":
        from vader.plan import plan_main

        print(plan_main(args.config, overrides, budget=args.budget, do_fit=args.fit, gpu=args.gpu,
                        tflops=args.tflops, mfu=args.mfu, all_steps=args.all_steps,
                        num_processes=args.num_processes))
        return 0
    cfg = load_config(args.config, overrides)
    if args.command == "inspect":
        from vader.inspection import inspect

        print(inspect(cfg, part=args.part, keys=args.keys))
        return 0
    if args.command == "config":
        from vader.inspection import resolved_values

        print(json.dumps({**cfg.to_dict(), "resolved": resolved_values(cfg)}, indent=2, default=str))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    training = args.command == "train" or (args.command == "run" and cfg.is_vader_training)
    with sigterm_raises():
        quiet_loading_bars()
        if training:
            from vader.train import train

            train(cfg)
        else:
            from vader.infer import infer

            infer(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
