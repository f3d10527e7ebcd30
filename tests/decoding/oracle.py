"""Test oracle: ReFusion for one request, following shared/refusion-spec.md literally.

transformers' Qwen3ForCausalLM with a DynamicCache, batch 1, host-side control flow as in the spec,
the cache copied once per branch in slot completion, completed slots' KV appended to the main cache
as computed in their branches. Greedy only (temperature 0). `events` counts which paths ran, so a test
can assert that it covered what it claims. `logprob_rows` holds, per generated position, the
log_softmax row of the read that accepted its token (a slot's first token: its plan read; others: the
verify read, or in slot completion the token's last draft or verify read): what the engine's
log probabilities must equal.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class OracleResult:
    output_ids: list[int]  # generated ids in text order, up to and excluding the first EOS
    forwards: int  # engine-equivalent forward count (a branch round is 2, however many branches)
    events: Counter = field(default_factory=Counter)
    logprob_rows: dict = field(default_factory=dict)  # logical position -> [V] float32 log_softmax row


def _crop(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def hf_forward(model, cache: DynamicCache, tokens: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """transformers' forward of `tokens` at `positions` (default: right after the cache), their KV appended to
    `cache`; float32 logits [len, V]."""
    position_ids = None if positions is None else torch.tensor([positions])
    out = model(input_ids=torch.tensor([tokens]), position_ids=position_ids, use_cache=True,
                **{_cache_keyword(): cache})
    return out.logits[0].float()


@functools.cache
def _cache_keyword() -> str:
    """Qwen3ForCausalLM.forward's keyword for its KV cache (the oracle's models are all Qwen3; a caller may
    wrap one, as bench/gpu_check_baselines.py does): `cache` where the installed transformers has it (5.25
    has it, and warns that `past_key_values` goes in 5.40), else `past_key_values` (pyproject allows >= 4.51)."""
    from transformers import Qwen3ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


def _append_kv(cache: DynamicCache, source: DynamicCache, start: int, length: int) -> None:
    """Append rows start..start+length of every layer of `source` to `cache`."""
    for layer, src in zip(cache.layers, source.layers):
        layer.keys = torch.cat([layer.keys, src.keys[:, :, start : start + length]], dim=2)
        layer.values = torch.cat([layer.values, src.values[:, :, start : start + length]], dim=2)


def refusion_oracle(model, prompt_ids, *, gen_length, slot_size, serial_num_blocks, slot_threshold,
                    token_threshold, eos_id, mask_id, suffix_ids=(), temperature=0.0, seed=0) -> OracleResult:
    """Decode one request by the spec; returns its output, forward count and path events.

    temperature > 0: the plan's argmax is taken over exp(logits) / (-log u)**T in float64 (the reference's
    Gumbel-max), u keyed by (seed, forwards so far, logical position) as workers/batch.py documents, so
    the engine can match token for token. eos_id: the EOS id, or a set of ids each of which is EOS
    wherever the spec names it (a model's several end tokens: DecodeParams.ends).
    """
    return _Oracle(model, prompt_ids, gen_length, slot_size, serial_num_blocks, slot_threshold, token_threshold,
                   eos_id, mask_id, suffix_ids, temperature, seed).run()


class _Oracle:
    def __init__(self, model, prompt_ids, gen_length, S, blocks, slot_threshold, token_threshold, eos_id, mask_id,
                 suffix_ids, temperature, seed):
        self.model, self.S, self.blocks = model, S, blocks
        self.temperature, self.seed = temperature, seed
        self.gen_length = -(-gen_length // S) * S
        self.slot_threshold, self.token_threshold, self.mask_id = slot_threshold, token_threshold, mask_id
        self.ends = {eos_id} if isinstance(eos_id, int) else set(eos_id)
        self.P = len(prompt_ids)
        # context the first plan carries: prompt, then the infill suffix after the generation span
        self.ctx = list(prompt_ids) + list(suffix_ids)
        self.ctx_pos = list(range(self.P)) + [self.P + self.gen_length + i for i in range(len(suffix_ids))]
        self.cache = DynamicCache()
        self.accepted: dict[int, int] = {}
        self.res = OracleResult([], 0)
        self.ev = self.res.events
        self.finish = False

    def _uniform(self, positions: list[int], vocab: int) -> torch.Tensor:
        """u [len(positions), vocab] float64 keyed by (seed, forwards before this plan, logical position): the
        runner's documented counter-based draws (workers/batch.py, workers.reads.uniform)."""
        from workers.reads import uniform

        n = len(positions)
        seed = torch.full((n,), self.seed, dtype=torch.long)
        step = torch.full((n,), self.res.forwards - 1, dtype=torch.long)  # called after the plan counted
        return uniform(seed, step, torch.tensor(positions, dtype=torch.long), vocab)

    def run(self) -> OracleResult:
        block_len = self.gen_length // self.blocks
        for block in range(self.blocks):
            self.ev["blocks"] += 1
            b0 = self.P + block * block_len
            pool = list(range(b0, b0 + block_len, self.S))
            while pool:
                pool = self._step(pool)
            if self.finish:
                break
        for pos in sorted(self.accepted):
            if self.accepted[pos] in self.ends:
                break
            self.res.output_ids.append(self.accepted[pos])
        return self.res

    def _step(self, pool: list[int]) -> list[int]:
        """One pass of the spec's loop body; returns the new pool."""
        S, ev = self.S, self.ev
        base = self.cache.get_seq_length() + len(self.ctx)
        # 1. plan: pool slots as masks after the cache (the first plan also carries the context)
        mask_pos = [s + j for s in pool for j in range(S)]
        tokens = self.ctx + [self.mask_id] * len(mask_pos)
        logits = hf_forward(self.model, self.cache, tokens, self.ctx_pos + mask_pos)[len(self.ctx):]
        self.res.forwards += 1
        self.ctx, self.ctx_pos = [], []
        _crop(self.cache, base)
        x0 = logits.argmax(-1)
        if self.temperature > 0:  # Gumbel noise on the planning argmax only; confidence stays noise-free
            u = self._uniform(mask_pos, logits.shape[-1])
            x0 = (logits.double().exp() / (-torch.log(u)) ** self.temperature).argmax(-1)
            self.ev["gumbel_plans"] += 1
        p0 = logits.softmax(-1).gather(-1, x0[:, None])[:, 0]
        plan_rows = logits.log_softmax(-1)
        drafts = {s: (x0[i * S:(i + 1) * S].tolist(), p0[i * S:(i + 1) * S].tolist()) for i, s in enumerate(pool)}
        chosen = [s for s in pool if drafts[s][1][0] > self.slot_threshold]
        if not chosen:
            conf = [drafts[s][1][0] for s in pool]
            chosen = [pool[conf.index(max(conf))]]
            ev["single_slot_fallback"] += 1
        # 2. verify: chosen drafts in position order, clean; shifted probabilities
        flat = [t for s in chosen for t in drafts[s][0]]
        flat_pos = [s + j for s in chosen for j in range(S)]
        verify_logits = hf_forward(self.model, self.cache, flat, flat_pos)
        probs = verify_logits.softmax(-1)
        verify_rows = verify_logits.log_softmax(-1)
        rows = [plan_rows[pool.index(flat_pos[k]) * S] if k % S == 0 else verify_rows[k - 1] for k in range(len(flat))]
        self.res.forwards += 1
        passes = [k % S == 0 or probs[k - 1, flat[k]].item() > self.token_threshold for k in range(len(flat))]
        prefix = next((k for k, ok in enumerate(passes) if not ok), len(passes))
        eos_at = next((k for k in range(prefix) if flat[k] in self.ends), None)
        if eos_at is not None:
            ev["eos_in_verify_prefix"] += 1
            last = eos_at // S
            self.accepted.update(zip(flat_pos[: eos_at + 1], flat[: eos_at + 1]))
            self.res.logprob_rows.update(zip(flat_pos[: eos_at + 1], rows))
            _crop(self.cache, base + eos_at + 1)
            ev["pool_slots_dropped_after_verify_eos"] += len([s for s in pool if s > chosen[last]])
            self.finish = True
            return [s for s in pool if s < chosen[last] and s not in chosen[:last]]
        if prefix >= S:
            whole = prefix // S
            ev["whole_slots_at_verify"] += whole
            self.accepted.update(zip(flat_pos[: whole * S], flat[: whole * S]))
            self.res.logprob_rows.update(zip(flat_pos[: whole * S], rows))
            _crop(self.cache, base + whole * S)
            return [s for s in pool if s not in chosen[:whole]]
        _crop(self.cache, base)
        tags = [[all(passes[i * S: i * S + j + 1]) for j in range(S)] for i in range(len(chosen))]
        slot_rows = [rows[i * S:(i + 1) * S] for i in range(len(chosen))]
        return self._complete_and_commit(pool, chosen, [list(drafts[s][0]) for s in chosen], tags, base, slot_rows)

    def _complete_and_commit(self, pool, chosen, slots, tags, base, slot_rows) -> list[int]:
        """Spec steps 3-4: complete in branches (one cache copy each), then append each slot's branch KV."""
        S, ev = self.S, self.ev
        ev["slot_completion"] += 1
        branches = list(chosen)
        caches = [copy.deepcopy(self.cache) for _ in branches]
        rounds, eos_branch = _complete(self.model, caches, slots, branches, tags, base, S, self.token_threshold,
                                       self.ends, self.mask_id, ev, slot_rows)
        self.res.forwards += 2 * rounds
        kept = [t for slot in slots for t in slot]
        if eos_branch is not None:
            kept = kept[: next(i for i, t in enumerate(kept) if t in self.ends) + 1]
        for i, br_cache in enumerate(caches):
            n = min(S, len(kept) - i * S)
            if n <= 0:
                break
            _append_kv(self.cache, br_cache, base, n)
            self.accepted.update((branches[i] + j, slots[i][j]) for j in range(n))
            self.res.logprob_rows.update((branches[i] + j, slot_rows[i][j]) for j in range(n))
        pool = [s for s in pool if s not in chosen]
        if eos_branch is not None:
            ev["pool_slots_dropped_after_completion_eos"] += len([s for s in pool if s > branches[eos_branch]])
            pool = [s for s in pool if s < branches[eos_branch]]
            self.finish = True
        return pool


def _complete(model, caches, slots, branches, tags, base, S, token_threshold, ends, mask_id, ev, slot_rows):
    """Spec step 3 rounds; mutates slots/branches/caches/tags/slot_rows (each token's latest read row).
    Returns (rounds, EOS branch index or None)."""
    apl = 0  # common verified prefix committed to every branch's cache rows
    rounds = 0
    eos_branch = None
    while not all(all(t) for t in tags):
        rounds += 1
        for b in range(len(slots)):  # draft: unverified tokens as masks; argmax at masked rows (no shift)
            inp = [t if ok else mask_id for t, ok in zip(slots[b][apl:], tags[b][apl:])]
            logits = hf_forward(model, caches[b], inp, [branches[b] + j for j in range(apl, S)])
            _crop(caches[b], base + apl)
            x = logits.argmax(-1).tolist()
            slots[b][apl:] = [t if ok else d for t, ok, d in zip(slots[b][apl:], tags[b][apl:], x)]
            draft_rows = logits.log_softmax(-1)
            for j in range(apl, S):
                if not tags[b][j]:
                    slot_rows[b][j] = draft_rows[j - apl]
        for b in range(len(slots)):  # verify: clean, kept; shifted probabilities
            logits = hf_forward(model, caches[b], slots[b][apl:], [branches[b] + j for j in range(apl, S)])
            probs = logits.softmax(-1)
            verify_rows = logits.log_softmax(-1)
            before = list(tags[b])
            for j in range(apl + 1, S):
                if not before[j - 1]:  # scored this round (a token after a verified one passes unread)
                    slot_rows[b][j] = verify_rows[j - apl - 1]
            ok = True
            for j in range(apl, S):
                passes = j == apl or before[j - 1] or probs[j - apl - 1, slots[b][j]].item() > token_threshold
                ok = ok and passes
                tags[b][j] = ok
        for b in range(len(slots)):
            verified = [t for t, ok in zip(slots[b], tags[b]) if ok]
            if ends & set(verified):
                ev["eos_in_completion"] += 1 if eos_branch is None else 0
                eos_branch = b
                del slots[b + 1:], branches[b + 1:], caches[b + 1:], tags[b + 1:], slot_rows[b + 1:]
                tags[b] = [True] * S
                break
        common = min(sum(t[apl:]) for t in tags)
        apl += common - 1 if not all(all(t) for t in tags) else common
        for c in caches:
            _crop(c, base + apl)
    return rounds, eos_branch
