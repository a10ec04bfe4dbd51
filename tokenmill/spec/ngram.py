"""n-gram prompt lookup: find the latest earlier occurrence of the context's tail and propose what
followed it. Wins on input-grounded work (summaries, edits, answers from a document), where the
output copies spans of the prompt. Pure Python: no model, no state."""
from __future__ import annotations


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier match of the longest tail of
        `token_ids` (max_n down to min_n tokens long); [] when no tail recurs."""
        n_tokens = len(token_ids)
        if limit <= 0:
            return []
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            tail = token_ids[n_tokens - n:]
            first = tail[0]
            # scan right to left so the latest match wins; a match must end before the tail starts
            for start in range(n_tokens - n - 1, -1, -1):
                if token_ids[start] == first and token_ids[start:start + n] == tail:
                    return token_ids[start + n:start + n + limit]
        return []
