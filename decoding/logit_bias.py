"""The (token, bias) pairs an AR step carries (workers.batch.Segment.logit_bias): OpenAI's logit_bias, the
presence and frequency penalties of the text so far, and the bans.

Each generated token's logit loses presence + frequency x its count (OpenAI's penalties; handed-off text
and an infill's prior text count too); the mask token is banned always (TOKEN_BAN, replacing the token's
bias: it is an input marker, never text; the shipped model sampled it at temperature 0.7, and the runner
leaves it out of the top alternatives too, workers.results.token_logprobs), and EOS under vLLM's
ignore_eos or while fewer than min_tokens are generated. Counts are kept as tokens arrive and only their
entries updated: recomputing every entry each step cost O(distinct tokens) interpreted work per request
per step (63 us at 128 tokens).
"""

from __future__ import annotations

from collections import Counter

from decoding.params import DecodeParams
from workers.batch import TOKEN_BAN


class LogitBias:
    """One AR request's logit bias, updated as its tokens arrive (decoding.ar.ARDecoder owns one)."""

    def __init__(self, params: DecodeParams):
        self.params = params
        self._counts: Counter | None = None  # penalties: counts of prior_ids + generated[:_counted]
        self._counted = 0
        # penalties: the logit_bias entries of tokens not counted yet, and each counted token's bias
        self._uncounted: dict[int, float] = {}
        self._penalized: dict[int, float] = {}

    @property
    def counted(self) -> int:
        """Distinct tokens counted so far: the last pairs `pairs` returns (workers.batch.FeedbackPenalty's
        `unseen` is how many come before them)."""
        return len(self._penalized)

    def pairs(self, prior_ids: list[int], generated: list[int], in_flight: int = 0) -> tuple[tuple[int, float], ...]:
        """The step's pairs: `prior_ids` (text before the generation: handed-off, an infill's) and
        `generated` are the text so far on the host; `in_flight`: generated tokens not yet on the host
        (plan_ahead's one), counted for min_tokens; the penalties are of the tokens on the host (the
        runner adds the one in flight's: Segment.feedback_penalty). With penalties, the pairs of tokens
        not generated come first, then the counted ones."""
        p = self.params
        ban_eos = p.ignore_eos or len(generated) + in_flight < p.min_tokens
        banned = (p.mask_token_id, *p.ends) if ban_eos else (p.mask_token_id,)
        user = p.logit_bias or {}
        if not (p.presence_penalty or p.frequency_penalty):
            return tuple({**user, **dict.fromkeys(banned, TOKEN_BAN)}.items())
        if self._counts is None:
            self._counts, self._counted, self._uncounted = Counter(), 0, dict(user)
            new = prior_ids + generated
        else:
            new = generated[self._counted:]
        self._counted = len(generated)
        for token in new:
            count = self._counts[token] + 1
            self._counts[token] = count
            self._uncounted.pop(token, None)
            self._penalized[token] = user.get(token, 0.0) - p.presence_penalty - p.frequency_penalty * count
        uncounted, penalized = self._uncounted, self._penalized
        for token in banned:  # (the ban replaces the token's bias, wherever it is)
            if token in penalized:
                penalized = {**penalized, token: TOKEN_BAN}
            else:
                uncounted = {**uncounted, token: TOKEN_BAN}
        # The tokens not counted first, then the counted ones (FeedbackPenalty.unseen relies on the order)
        return tuple(uncounted.items()) + tuple(penalized.items())
