"""``litdata``'s ``StreamingDataLoader`` with one fix for Lightning's resume; imported only where ``litdata`` is used
(it is an optional dependency)."""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader

__all__ = ["ResumableStreamingDataLoader"]


class ResumableStreamingDataLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose resumed epoch ends where Lightning ends it.

    After ``load_state_dict`` the loader's ``restore`` flag stays set until its iterator runs to ``StopIteration``.
    Lightning never asks for more than ``len(loader)`` batches, so the resumed epoch's iterator is left suspended on
    its last batch, the flag stays set, and the next epoch replays the resumed epoch's tail instead of starting
    afresh (seen with litdata 0.2.76 and Lightning 2.6). The flag is cleared as the epoch's last batch is handed out.
    """

    def __iter__(self) -> Any:
        for batch in super().__iter__():
            if self._num_samples_yielded_streaming >= len(self) * self.batch_size:
                self.restore = False
            yield batch
