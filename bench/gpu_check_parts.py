"""The Workbench the in-process parts of bench/gpu_check.py share, and what else they share: the model
configs, the table's Row, the parts' outcomes (PartSkipped, PartFailed), the runner variants
(FORWARD_VARIANTS) and an engine on the shared runner (new_engine). The parts: gpu_check_forward.py
(forward, profile), gpu_check_attention.py, gpu_check_engine.py (engine, features, host) and
gpu_check_baselines.py.

The model is built once, on the device, by workers.model.random_model (bench/gpu_check_baselines.py
gives transformers the same tensors). Prompts
are the shipped model's tokenizer's encodings of bench/concurrency.py's PROMPTS. That tokenizer knows
4096 ids, the 8B shape's random model emits up to 151,936: `clipped_tokenizer`'s decode drops the ids it
does not know. (tokenizers 0.23.3 skips them silently too, so the engine would not crash without it;
the wrapper makes that independent of the version. Only the streamed text, which no part measures,
loses them; token counts come from the ids.)
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import forward_latency  # noqa: E402
from workers.loader import ModelConfig, load_tokenizer  # noqa: E402
from workers.model import Qwen3, random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

SHIPPED_MODEL = ROOT / "models" / "refusion-tiny-code"
CONFIGS = {
    **forward_latency.CONFIGS,
    # The CPU dry run: a few ms per forward on one core; its vocabulary is the shipped tokenizer's.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, eos_token_id=0, mask_token_id=2),
}
SLOT_SIZE, SERIAL_NUM_BLOCKS = 8, 4  # decoding.params.SERVING_DEFAULTS; gen_length must be a multiple of 32


@dataclass
class Row:
    """One line of the summary table: a measurement, its value, the issue's target and whether it is met."""

    measurement: str
    value: str
    target: str = "-"
    met: bool | None = None


def clipped_tokenizer(tokenizer):
    """The shipped tokenizer for a model with a larger vocabulary: a shallow copy whose `decode` drops ids
    >= its size. Still the transformers fast tokenizer it was, so grammars (llguidance) build on it."""
    known, decode = len(tokenizer), tokenizer.decode
    clipped = copy.copy(tokenizer)

    def clipped_decode(ids, *args, **kwargs) -> str:
        return decode([i for i in ids if i < known], *args, **kwargs)

    clipped.decode = clipped_decode
    return clipped


class Workbench:
    """What the parts share: device, shape, the time budget, and the model, tokenizer, engine runner and
    transformers twin, each built on first use (a part that fails to build one records the error)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.cfg = CONFIGS[args.config]
        self.deadline = time.monotonic() + args.budget_s
        self._built: dict = {}
        self.forward_results: dict[str, dict] = {}  # variant -> the forward part's measurements

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def shared(self, name: str, build):
        """The object built once under `name` (by `build()` on first use)."""
        if name not in self._built:
            self._built[name] = build()
        return self._built[name]

    def model(self) -> Qwen3:
        return self.shared("model", lambda: random_model(self.cfg, dtype=self.dtype, device=self.device))

    def tokenizer(self):
        return self.shared("tokenizer", lambda: clipped_tokenizer(load_tokenizer(SHIPPED_MODEL)))

    def engine_variant(self) -> str:
        """The forward variant the engine and baselines parts run: --engine-variant, or with "fastest" the
        variant whose forward part medians summed over the token counts are lowest; when the forward part
        has not run (or measured nothing) before the first call, the runner's defaults on this device
        (compiled+graphs on CUDA, eager elsewhere), recorded as such (`engine_variant_from`). Fixed at
        the first call."""
        def choose() -> str:
            if self.args.engine_variant != "fastest":
                self._built["engine_variant_from"] = "given"
                return self.args.engine_variant
            sums = {name: sum(t["median_ms"] for t in found["tokens"].values())
                    for name, found in self.forward_results.items() if found.get("tokens")}
            if sums:
                self._built["engine_variant_from"] = "fastest forward"
                return min(sums, key=sums.get)
            self._built["engine_variant_from"] = "runner defaults (no forward measured before it)"
            return "compiled+graphs" if self.device.type == "cuda" else "eager"
        return self.shared("engine_variant", choose)

    def engine_runner(self) -> ModelRunner:
        # Room for every request of the largest level at once (prompt, generation, slack), prefix cache aside.
        per_request = (64 + self.args.gen_length) // 16 + 4
        blocks = max(self.args.levels) * per_request + 64
        options = {**FORWARD_VARIANTS[self.engine_variant()], **self.args.runner_options}
        return self.shared("runner", lambda: ModelRunner.from_model(
            self.model(), mask_token_id=self.cfg.mask_token_id, num_blocks=blocks, **options))

    def decode_params(self) -> dict:
        """Request parameters: the serving defaults, with this run's gen_length, all named explicitly."""
        from decoding.params import SERVING_DEFAULTS

        names = ("slot_threshold", "token_threshold")
        return {"gen_length": self.args.gen_length, "slot_size": SLOT_SIZE, "serial_num_blocks": SERIAL_NUM_BLOCKS,
                **{k: SERVING_DEFAULTS[k] for k in names}}


class PartSkipped(Exception):
    """A part that cannot run here (no CUDA, a missing optional package): recorded as skipped, not failed."""


class PartFailed(Exception):
    """A part that ran and measured, but failed: its results and rows are kept."""

    def __init__(self, results: dict, rows: list[Row], message: str):
        super().__init__(message)
        self.results, self.rows = results, rows


# Every option named: the runner's defaults on CUDA are compile_layers and cuda_graphs on (workers.runner).
_EAGER = {"attention": "sdpa", "cuda_graphs": False, "compile_layers": False}
FORWARD_VARIANTS = {"eager": _EAGER, "flex": {**_EAGER, "attention": "flex"}, "graphs": {**_EAGER, "cuda_graphs": True},
                    "flex+graphs": {**_EAGER, "attention": "flex", "cuda_graphs": True},
                    "compiled": {**_EAGER, "compile_layers": True},
                    "compiled+graphs": {**_EAGER, "compile_layers": True, "cuda_graphs": True},
                    "flex+compiled+graphs": {"attention": "flex", "compile_layers": True, "cuda_graphs": True},
                    "paged": {**_EAGER, "attention": "paged"},
                    "paged+compiled": {**_EAGER, "attention": "paged", "compile_layers": True},
                    "paged+compiled+graphs": {"attention": "paged", "compile_layers": True, "cuda_graphs": True}}


def new_engine(bench: Workbench):
    """An engine on the shared runner, routing not calibrated (both modes here are fixed)."""
    from scheduler.config import EngineConfig, RoutingConfig
    from scheduler.engine import Engine

    config = EngineConfig(max_running=max(64, max(bench.args.levels)), token_budget=bench.args.token_budget,
                          routing=RoutingConfig(calibrate=False))
    return Engine(bench.engine_runner(), bench.tokenizer(), config)


def requests_ended_by_error(engine) -> int:
    """Requests the engine has ended with an error: a forward that raises (out of memory, say) ends its
    requests with an error delta instead of raising, so a level that looks finished may not be."""
    value = engine.metrics.registry.get_sample_value("refusion_requests_finished_total", {"reason": "error"})
    return int(value or 0)
