"""What a pipeline holds in load order (IP-Adapters, T2I-Adapters, LoRAs, ControlNets): one list-like base."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class LoadOrder(Generic[T]):
    """Things loaded into a pipeline, in load order: index them like a list. `what` names them in errors."""

    what = "item"

    def __init__(self):
        self.loaded: list[T] = []
        self.keep: dict | None = None  # models by folder, kept across unloads (batch jobs share them); off: None

    def model_for(self, folder, load: Callable[[], object]) -> object:
        """`load()`, or while models are kept, the model read for `folder` before."""
        if self.keep is None:
            return load()
        if folder not in self.keep:
            self.keep[folder] = load()
        return self.keep[folder]

    def __len__(self) -> int:
        return len(self.loaded)

    def __getitem__(self, index: int) -> T:
        return self.loaded[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self.loaded)

    def append(self, item: T) -> int:
        """Add one; returns its index."""
        self.loaded.append(item)
        return len(self.loaded) - 1

    def checked(self, index: int) -> int:
        """`index` if one is loaded there, else one clear line."""
        if type(index) is not int or not 0 <= index < len(self.loaded):
            raise UserError(f"no {self.what} at index {index!r:.20} ({len(self.loaded)} loaded)")
        return index

    def unload(self, index: int | None = None) -> None:
        """Remove one (by index) or all."""
        if index is None:
            self.loaded.clear()
        else:
            self.loaded.pop(self.checked(index))
