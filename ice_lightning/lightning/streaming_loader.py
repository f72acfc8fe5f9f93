"""``litdata``'s ``StreamingDataLoader`` with one fix for Lightning's resume; imported only where ``litdata`` is used
(it is an optional dependency)."""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader

__all__ = ["ResumableStreamingDataLoader"]


class ResumableStreamingDataLoader(StreamingDataLoader):
    """A ``StreamingDataLoader`` whose resumed epoch ends where Lightning ends it.

    After ``load_state_dict`` the loader's ``restore`` flag stays set until its iterator runs to ``StopIteration``.
    Lightning stops asking at ``len(loader)`` batches (or ``limit_train_batches``, or ``max_steps``), so the resumed
    epoch's iterator is left suspended, the flag stays set, and the next epoch replays the resumed epoch's tail
    instead of starting afresh (seen with litdata 0.2.76 and Lightning 2.6). Here a new iteration after the resumed
    one has handed out a batch clears the flag first.
    """

    _resumed_epoch_began = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resumed_epoch_began = False

    def __iter__(self) -> Any:
        if getattr(self, "restore", False) and self._resumed_epoch_began:  # a new epoch: the resumed one is over
            self.restore = False
        self._resumed_epoch_began = False
        for batch in super().__iter__():
            self._resumed_epoch_began = getattr(self, "restore", False)  # a litdata without the flag: nothing to do
            yield batch
