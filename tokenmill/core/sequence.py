"""A Sequence: token ids, how many of them have their KV computed, and the pages holding them."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.core.beam import BeamGroup


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED)


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    index: int = 0                                   # which of the request's n samples this is
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0                       # prompt tokens served from the prefix cache
    block_tables: list[list[int]] = field(default_factory=lambda: [[]])  # per KV group; -1 = page released
    status: SequenceStatus = SequenceStatus.WAITING
    pending_forks: list["Sequence"] = field(default_factory=list)  # siblings created when the prompt is done
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    block_hashes: list[tuple[bytes, tuple[int, ...]]] = field(default_factory=list)  # chained hashes of full blocks
    num_hashed_blocks: int = 0                       # leading pages of block_table registered in the prefix cache
    beam: BeamGroup | None = None                    # the beam search group this sequence is a beam of
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify in its next step

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        """The pages of KV group 0 (full attention when the model has any; never released then)."""
        return self.block_tables[0]

    @block_table.setter
    def block_table(self, table: list[int]) -> None:
        self.block_tables[0] = table

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def in_prompt(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def fork(self, index: int) -> "Sequence":
        """A sibling sharing everything computed so far (pages are shared by the block manager)."""
        return Sequence(request_id=self.request_id, token_ids=list(self.token_ids), params=self.params,
                        index=index, num_prompt_tokens=self.num_prompt_tokens,
                        num_computed_tokens=self.num_computed_tokens, num_cached_tokens=self.num_cached_tokens,
                        status=self.status, block_hashes=list(self.block_hashes), beam=self.beam)
