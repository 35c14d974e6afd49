"""``ithaca serve | generate | worker-node``: argparse -> config objects -> run.

ithaca serve Qwen/Qwen-Image --usp 2 --ring 2          # OpenAI-compatible server
ithaca generate --prompt "a fox" --output fox.png      # offline, same engine
ithaca worker-node MODEL --usp 4 --nnodes 2 --node-rank 1 --master-addr HOST --master-port P
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys

from ithaca.config import (
    CacheConfig,
    ParallelConfig,
    ServerConfig,
    parse_lora_option,
)


def _degree(value: str) -> int | str:
    """A positive degree, or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


_FLAG_TYPES = {"int": int, "float": float, "str": str, "str | None": str}


def _parallel_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`ParallelConfig` field that declares one (``config.flag``),
    then the flags of ``--usp auto``, the dtype and the step cache."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(ParallelConfig):
        if "flags" not in f.metadata:
            continue
        options = dict(f.metadata)
        names, title = options.pop("flags"), options.pop("group")
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        if f.type == "bool":
            options["action"] = "store_true"
        else:
            kind = _degree if f.name == "ulysses_degree" else _FLAG_TYPES[f.type]
            options.update(type=kind, default=f.default)
        groups[title].add_argument(*names, dest=f.name, **options)
    g = groups["parallelism"]
    g.add_argument("--world-size", type=int, default=None, help="GPUs for --usp auto")
    g.add_argument(
        "--interconnect", choices=["auto", "nvlink", "pcie"], default="auto",
        help="--usp auto: GPU links (auto reads nvidia-smi topo -m)",
    )  # fmt: skip
    g.add_argument(
        "--expect-cfg", action="store_true",
        help="--usp auto: requests will use true CFG (a negative prompt)",
    )  # fmt: skip
    g = groups["placement (docs/memory.md)"]
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    g.add_argument("--cache-backend", default=None, help="step cache, e.g. tea_cache")
    g.add_argument("--cache-config", default=None, help="JSON object of cache settings")


def _auto_size(args) -> tuple[int, int]:
    """The request size --usp auto plans for: --width/--height, else the checkpoint's."""
    width, height = getattr(args, "width", None), getattr(args, "height", None)
    if width and height:
        return width, height
    defaults = {}
    index = os.path.join(args.model or "", "model_index.json")
    if args.model and os.path.isfile(index):
        with open(index) as f:
            defaults = json.load(f).get("_ithaca_defaults", {})
    return width or defaults.get("width", 1024), height or defaults.get("height", 1024)


def _auto_parallel(args, dp: int) -> ParallelConfig:
    from ithaca.autolayout import plan

    if args.ring_degree != 1 or args.cfg_parallel_size != 1 or dp != 1:
        raise ValueError(
            "--usp auto chooses the ring, cfg and data-parallel degrees too; drop --ring, "
            "--cfg-parallel-size and --data-parallel-size"
        )
    world = args.world_size
    if world is None:
        from ithaca.engine.engine import local_gpus

        world = len(local_gpus())
        if world == 0:
            raise ValueError("--usp auto on a machine without GPUs needs --world-size N")
    cfg = args.expect_cfg or bool(
        getattr(args, "negative_prompt", None) is not None
        and (getattr(args, "true_cfg_scale", None) or 0) > 1
    )
    if getattr(args, "model", None) is None:  # serve: the first of its models
        given = [*getattr(args, "models", []), *getattr(args, "more_models", [])]
        args.model = (given[0].rpartition("@")[0] or given[0]) if given else None
    if args.model is None:
        from ithaca.engine.executor import default_model_path

        args.model = default_model_path()
    interconnect = None if args.interconnect == "auto" else args.interconnect
    chosen = plan(world, args.model, _auto_size(args), cfg, interconnect)
    print(f"ithaca: --usp auto: {chosen.reason}", file=sys.stderr)
    return ParallelConfig(**{**_flagged(args), **chosen.degrees})


def _flagged(args) -> dict:
    """The :class:`ParallelConfig` fields the command line set (``_parallel_args``)."""
    fields = dataclasses.fields(ParallelConfig)
    return {f.name: getattr(args, f.name) for f in fields if "flags" in f.metadata}


def _parallel(args, dp: int = 1) -> ParallelConfig:
    if args.ulysses_degree == "auto":
        if args.tensor_parallel_size != 1:
            raise ValueError(
                "--usp auto plans sequence parallelism only; drop --tensor-parallel-size"
            )
        return _auto_parallel(args, dp)
    return ParallelConfig(**_flagged(args), data_parallel_size=dp)


def add_underscore_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept ``--num_inference_steps`` for every ``--num-inference-steps`` (the reference
    documents' spelling), on ``parser`` and all its subcommands; help shows the hyphens."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                add_underscore_aliases(sub)
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_")
            if option.startswith("--") and alias != option:
                parser._option_string_actions.setdefault(alias, action)


def _cache(args) -> CacheConfig:
    options = None
    if args.cache_config:
        try:
            options = json.loads(args.cache_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--cache-config is not valid JSON: {exc}") from exc
    return CacheConfig.from_dict(args.cache_backend, options)  # validates, once


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ithaca", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the OpenAI-compatible server")
    s.add_argument(
        "models", nargs="*", metavar="MODEL",
        help="checkpoint(s), each optionally MODEL@usp=2,ring=1,cfg=1,dp=1,name=NAME (its own "
        "layout; default: the flags below); none: the default image and video models",
    )  # fmt: skip
    s.add_argument("--model", action="append", default=[], dest="more_models",
                   metavar="MODEL", help="another model (repeatable), same syntax")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8091)
    s.add_argument("--data-parallel-size", type=int, default=1)
    s.add_argument("--api-key", default=os.environ.get("ITHACA_API_KEY"))
    s.add_argument("--max-queue-size", type=int, default=64)
    s.add_argument("--max-batch-size", type=int, default=4)
    s.add_argument("--batch-wait-ms", type=float, default=10.0)
    batching = {
        "--batch-invariant": "exact solo bytes per request: no fused forwards (slower)",
        "--continuous-batching": "requests join a running batch at the next step",
    }
    for flag, text in batching.items():
        s.add_argument(flag, action="store_true", help=text)
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the repeated blocks (cache in --state-dir)")  # fmt: skip
    s.add_argument("--compile-sizes", default="", metavar="WxH,...",
                   help="warm-up sizes of --compile (default: the model's)")  # fmt: skip
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--omni", action="store_true", help="accepted and ignored (reference CLI)")
    s.add_argument("--on-worker-failure", choices=["restart", "exit"], default="restart")
    s.add_argument("--executor", choices=["torchrun", "inprocess"], default="torchrun")
    s.add_argument("--state-dir", default=None, help="video jobs and url outputs")
    s.add_argument("--drain-timeout", type=float, default=30.0)
    s.add_argument("--startup-timeout", type=float, default=600.0)
    s.add_argument("--liveness-timeout", type=float, default=10.0)
    s.add_argument("--step-timeout", type=float, default=300.0)
    s.add_argument("--output-ttl", type=float, default=3600.0)
    s.add_argument("--video-ttl", type=float, default=7 * 24 * 3600.0)
    s.add_argument("--checkpoint-every", type=int, default=5,
                   help="a running video job saves its step state this often (steps)")  # fmt: skip
    s.add_argument("--max-body-bytes", type=int, default=64 * 2**20)
    s.add_argument("--max-input-pixels", type=int, default=4096 * 4096)
    s.add_argument("--max-output-pixels", type=int, default=2048 * 2048)
    s.add_argument("--max-steps", type=int, default=200)
    s.add_argument("--max-n", type=int, default=10)
    s.add_argument("--max-frames", type=int, default=241)
    s.add_argument("--max-request-seconds", type=float, default=1800.0)
    s.add_argument("--max-request-memory-gb", type=float, default=None)
    s.add_argument("--step-timeout-factor", type=float, default=10.0)
    s.add_argument("--lora", action="append", default=[], metavar="NAME=PATH[:SCALE][@MODEL]",
                   help="preload a LoRA adapter (into MODEL, default: the first)")  # fmt: skip
    s.add_argument("--max-loras", type=int, default=None, help="adapters resident (LRU)")
    s.add_argument("--lora-dir", default=None, help="POST /v1/loras loads from here only")
    s.add_argument("--lora-fuse", choices=["auto", "never"], default="never",
                   help="auto: merge an adapter set into the weights for a run")  # fmt: skip
    # Multi-node: defaults come from a LeaderWorkerSet's variables when present, so every
    # pod of a group can run the same command line; node rank > 0 runs only its ranks.
    s.add_argument("--nnodes", type=int, default=int(os.environ.get("LWS_GROUP_SIZE", "1")))
    s.add_argument(
        "--node-rank", type=int, default=int(os.environ.get("LWS_WORKER_INDEX", "0")),
        help="this node's index; > 0 joins the group's torchrun ranks without HTTP",
    )  # fmt: skip
    s.add_argument("--master-addr", default=os.environ.get("LWS_LEADER_ADDRESS", "127.0.0.1"))
    s.add_argument("--master-port", type=int, default=None)
    _parallel_args(s)

    g = sub.add_parser("generate", help="generate offline (no HTTP)")
    g.add_argument("--model", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--num-inference-steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--true-cfg-scale", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--image", action="append", default=[], help="input image (edits); repeat")
    g.add_argument("--num-frames", type=int, default=None, help="video: frame count")
    g.add_argument("--fps", type=int, default=None)
    g.add_argument("--guidance-scale-2", type=float, default=None)
    g.add_argument("--flow-shift", type=float, default=None)
    g.add_argument("--output", default="out.png", help="out.png / .jpg / .webp / .mp4")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--verbose", action="store_true",
        help="print each rank's parameter bytes and peak memory (stderr)",
    )  # fmt: skip
    _parallel_args(g)

    c = sub.add_parser(
        "calibrate-teacache", help="fit TeaCache coefficients for a model and print them"
    )
    c.add_argument("model", nargs="?", default=None, help="checkpoint (default: embedded model)")
    c.add_argument("--prompt", action="append", default=None, help="repeat; default: a set")
    c.add_argument("--image", action="append", default=[], help="input image (edits); repeat")
    c.add_argument("--num-inference-steps", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--degree", type=int, default=4)
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    c.add_argument("--write", action="store_true", help="store them in MODEL/ithaca.json")

    w = sub.add_parser("worker-node", help="join a multi-node worker group as node_rank > 0")
    w.add_argument("model", nargs="?", default=None)
    w.add_argument("--nnodes", type=int, required=True)
    w.add_argument("--node-rank", type=int, required=True)
    w.add_argument("--master-addr", required=True)
    w.add_argument("--master-port", type=int, required=True)
    _parallel_args(w)
    add_underscore_aliases(parser)
    return parser


def cmd_serve(args) -> int:
    from ithaca.server.serve import serve

    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank ({args.node_rank}) must be in 0..{args.nnodes - 1}")
    if args.node_rank > 0:  # a worker node: its torchrun ranks only, no HTTP front
        if args.master_port is None:
            raise ValueError("--master-port is required on a node with --node-rank > 0")
        first = _assign_loras(_model_entries(args), args.lora)[0]
        args.model, args.node_loras = first.model, first.loras
        return cmd_worker_node(args)

    models = _assign_loras(_model_entries(args), args.lora)
    config = ServerConfig(
        model=models[0].model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        api_key=args.api_key,
        max_queue_size=args.max_queue_size,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        batch_invariant=args.batch_invariant,
        continuous_batching=args.continuous_batching,
        compile=args.compile,
        compile_sizes=_sizes(args.compile_sizes),
        executor=args.executor,
        on_worker_failure=args.on_worker_failure,
        startup_timeout_s=args.startup_timeout,
        liveness_timeout_s=args.liveness_timeout,
        step_timeout_s=args.step_timeout,
        drain_timeout_s=args.drain_timeout,
        output_ttl_s=args.output_ttl,
        video_ttl_s=args.video_ttl,
        checkpoint_every=args.checkpoint_every,
        max_body_bytes=args.max_body_bytes,
        max_input_pixels=args.max_input_pixels,
        max_output_pixels=args.max_output_pixels,
        max_steps=args.max_steps,
        max_n=args.max_n,
        max_frames=args.max_frames,
        max_request_seconds=args.max_request_seconds,
        max_request_memory_gb=args.max_request_memory_gb,
        step_timeout_factor=args.step_timeout_factor,
        state_dir=args.state_dir,
        nnodes=args.nnodes,
        master_addr=args.master_addr,
        master_port=args.master_port,
        loras=models[0].loras,
        max_loras=args.max_loras,
        lora_dir=args.lora_dir,
        lora_fuse=args.lora_fuse,
    )
    return serve(config, models[0].parallel, _cache(args), models)


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"128x128,256x192"`` -> ``((128, 128), (256, 192))``."""
    sizes = []
    for item in filter(None, text.split(",")):
        width, sep, height = item.strip().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ValueError(f"--compile-sizes ({item!r}) must be WIDTHxHEIGHT")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


_LAYOUT_KEYS = {
    "usp": "ulysses_degree",
    "ring": "ring_degree",
    "cfg": "cfg_parallel_size",
    "dp": "data_parallel_size",
    "tp": "tensor_parallel_size",
    "vae": "vae_patch_parallel_size",
}


def parse_model(text: str, default: ParallelConfig):
    """``MODEL[@key=value,...]`` -> ``ModelEntry``; keys: usp, ring, cfg, dp, tp, vae, name."""

    from ithaca.server.serve import ModelEntry

    model, sep, options = text.rpartition("@")
    if not sep or "=" not in options:
        return ModelEntry(text, None, default)
    layout, name = {}, None
    for item in options.split(","):
        key, eq, value = item.partition("=")
        if key == "name" and eq and value:
            name = value
        elif key in _LAYOUT_KEYS and value.isdigit():
            layout[_LAYOUT_KEYS[key]] = int(value)
        else:
            raise ValueError(
                f"--model {text}: '{item}' must be name=NAME or one of "
                f"{', '.join(k + '=N' for k in _LAYOUT_KEYS)}"
            )
    return ModelEntry(model, name, dataclasses.replace(default, **layout))


def _assign_loras(entries: list, texts: list[str]) -> list:
    """``--lora NAME=PATH[:SCALE][@MODEL]``: each adapter to the served model it names
    (its name or checkpoint), without ``@MODEL`` to the first."""
    index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for key in (entry.name, entry.model):
            if key:
                index.setdefault(key, i)
    per_model: list[list] = [[] for _ in entries]
    for text in texts:
        head, at, model = text.rpartition("@")
        i = index.get(model) if at else None
        per_model[i or 0].append(parse_lora_option(head if i is not None else text))
    return [dataclasses.replace(e, loras=tuple(p)) for e, p in zip(entries, per_model, strict=True)]


def _model_entries(args) -> list:
    from ithaca.server.serve import ModelEntry, default_entries

    given = [*args.models, *args.more_models]
    # --usp auto plans for the first model (``_auto_parallel`` reads ``args.model``).
    args.model = parse_model(given[0], ParallelConfig()).model if given else None
    default = _parallel(args, args.data_parallel_size)
    if not given:
        return default_entries(default, getattr(args, "nnodes", 1))
    if len(given) == 1 and "@" not in given[0]:
        return [ModelEntry(given[0], args.served_model_name, default)]
    return [parse_model(text, default) for text in given]


def cmd_generate(args) -> int:
    from ithaca.api import Ithaca
    from ithaca.server.media import encode_image, encode_mp4

    ext = os.path.splitext(args.output)[1].lower().lstrip(".")
    fmt = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "mp4": "mp4"}.get(ext)
    if fmt is None:
        raise ValueError(f"--output ({args.output}) must end in .png, .jpg, .webp or .mp4")
    sampling = {
        k: getattr(args, k)
        for k in (
            "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
            "true_cfg_scale", "seed", "num_frames", "fps", "guidance_scale_2", "flow_shift",
        )
    }  # fmt: skip
    model = args.model
    if model is None and fmt == "mp4":  # the default video model, when the package has it
        from ithaca.engine.catalog import default_models

        model = default_models()[-1]
    show = not args.quiet and sys.stderr.isatty()
    gen = Ithaca(model, parallel=_parallel(args), cache=_cache(args), dtype=args.dtype)
    with gen, _progress(show, "steps") as bar:
        result = gen.generate(
            {"prompt": args.prompt, "images": args.image},
            num_images=args.num_images,
            on_progress=lambda step, total, _: bar(step, total),
            **sampling,
        )
        if args.verbose:
            for line in memory_lines(gen.engine.describe()):
                print(f"ithaca: {line}", file=sys.stderr)
    for warning in _unknown_words(model, args.prompt):
        print(f"ithaca: warning: {warning}", file=sys.stderr)
    if fmt == "mp4":
        if result.frames is None:
            raise ValueError("the model returned images, not video; use a .png output")
        with _progress(show, "frames") as bar:
            n = len(result.frames)
            done = iter(range(1, n + 1))
            data = encode_mp4(
                result.frames, result.fps or args.fps or 16, lambda: bar(next(done), n)
            )
        outputs = [args.output]
        blobs = [data]
    else:
        if not result.images:
            raise ValueError("the model returned video; use an .mp4 output")
        stem, suffix = os.path.splitext(args.output)
        outputs = [args.output] + [f"{stem}_{i}{suffix}" for i in range(1, len(result.images))]
        blobs = [encode_image(img, fmt) for img in result.images]
    for path, blob in zip(outputs, blobs, strict=True):
        with open(path, "wb") as f:
            f.write(blob)
        print(path)
    return 0


def memory_lines(groups: list[dict]) -> list[str]:
    """One line per rank: the weights it holds and its peak memory (``/health``'s numbers)."""
    gib = 1 << 30
    lines = []
    for group in groups:
        for r in group["ranks"]:
            if "parameter_bytes" not in r:
                continue
            lines.append(
                f"{group['name']} rank {r['rank']}: "
                f"parameters {r['parameter_bytes'] / gib:.3f} GiB "
                f"({r['offloaded_bytes'] / gib:.3f} GiB offloaded to the host), "
                f"peak memory {r['peak_memory_bytes'] / gib:.3f} GiB"
            )
    return lines


@contextlib.contextmanager
def _progress(show: bool, unit: str):
    """A tqdm bar on stderr driven by ``update(done, total)`` calls (any thread)."""
    if not show:
        yield lambda done, total: None
        return
    from tqdm import tqdm

    with tqdm(unit=unit, file=sys.stderr) as bar:

        def update(done: int, total: int) -> None:
            if bar.total != total:
                bar.reset(total)
            bar.update(done - bar.n)

        yield update


def _unknown_words(model: str | None, prompt: str) -> list[str]:
    from ithaca.engine.catalog import model_info
    from ithaca.engine.executor import default_model_path

    unknown = model_info(model or default_model_path()).unknown_words(prompt)
    if not unknown:
        return []
    return [f"unknown words for this model: {', '.join(unknown)} (ignored by the model)"]


def cmd_calibrate_teacache(args) -> int:
    import json

    import torch
    from PIL import Image

    from ithaca.calibrate import DEFAULT_PROMPTS, calibrate_teacache
    from ithaca.engine.executor import default_model_path

    model = args.model or default_model_path()
    coefficients, samples = calibrate_teacache(
        model,
        prompts=args.prompt or DEFAULT_PROMPTS,
        steps=args.num_inference_steps,
        width=args.width,
        height=args.height,
        degree=args.degree,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        images=[Image.open(path).convert("RGB") for path in args.image],
    )
    print(f"# {len(samples)} (input change, output change) samples from {model}")
    print(json.dumps({"teacache_coefficients": coefficients}))
    if args.write:
        path = os.path.join(model, "ithaca.json")
        existing = {}
        if os.path.isfile(path):
            with open(path) as f:
                existing = json.load(f)
        with open(path, "w") as f:
            json.dump({**existing, "teacache_coefficients": coefficients}, f, indent=2)
        print(f"wrote {path}")
    return 0


def cmd_worker_node(args) -> int:
    from ithaca.engine.executor import ENV_CONFIG, PipelineSpec, spec_to_json
    from ithaca.engine.group import torchrun_command

    parallel = _parallel(args)
    if parallel.world_size % args.nnodes:
        raise ValueError(
            f"world size ({parallel.world_size}) must be a multiple of nnodes ({args.nnodes})"
        )
    loras = getattr(args, "node_loras", ())  # the first model's --lora, as node 0's ranks
    spec = PipelineSpec(args.model, args.dtype, _cache(args), parallel, loras,
                        getattr(args, "max_loras", None),
                        fuse_loras=getattr(args, "lora_fuse", "never") == "auto")  # fmt: skip
    if args.compile:  # node 0's ranks warm up, and warm-up is collective: these too
        cache_dir = ServerConfig.compile_cache_dir(args.state_dir)
        spec = dataclasses.replace(
            spec, compile_cache_dir=cache_dir, compile_sizes=_sizes(args.compile_sizes)
        )
    os.environ[ENV_CONFIG] = spec_to_json(spec, heartbeat_interval_s=1.0)
    cmd = torchrun_command(
        parallel.world_size // args.nnodes,
        args.nnodes,
        args.node_rank,
        args.master_addr,
        args.master_port,
    )
    os.execv(cmd[0], cmd)
    return 0  # unreachable


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "calibrate-teacache":
            return cmd_calibrate_teacache(args)
        return cmd_worker_node(args)
    except ValueError as exc:
        print(f"ithaca: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
