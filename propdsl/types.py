"""The language's types. `Tensor[]` is `Real`; `Nat` and `Index[K]` are usable where `Real` is."""

from __future__ import annotations

from dataclasses import dataclass


class Ty:
    def show(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.show()


@dataclass(frozen=True)
class Scalar(Ty):
    kind: str  # "Real", "Nat", "Bool"

    def show(self) -> str:
        return self.kind


REAL = Scalar("Real")
NAT = Scalar("Nat")
BOOL = Scalar("Bool")


@dataclass(frozen=True)
class IndexTy(Ty):
    k: int
    label: bool = False

    def show(self) -> str:
        return f"{'Label' if self.label else 'Index'}[{self.k}]"


@dataclass(frozen=True)
class TensorTy(Ty):
    shape: tuple[int, ...]

    def show(self) -> str:
        return f"Tensor[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class NetworkTy(Ty):
    inp: TensorTy
    out: TensorTy

    def show(self) -> str:
        return f"{self.inp.show()} -> {self.out.show()}"


@dataclass(frozen=True)
class DomainTy(Ty):
    """A set of tensors of one shape; `shape is None` for scalar boxes that fit any shape."""

    shape: tuple[int, ...] | None

    def show(self) -> str:
        if self.shape is None:
            return "Domain[*]"
        return f"Domain[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class FiniteTy(Ty):
    """`range(K)` (elements `Index[K]`) or `classes` (elements `Label[K]`)."""

    k: int
    label: bool = False

    def show(self) -> str:
        return f"{'Classes' if self.label else 'Range'}[{self.k}]"


@dataclass(frozen=True)
class StringTy(Ty):
    def show(self) -> str:
        return "String"


@dataclass(frozen=True)
class ListTy(Ty):
    elem: Ty | None

    def show(self) -> str:
        return f"List[{self.elem.show() if self.elem else '?'}]"


@dataclass(frozen=True)
class OptionTy(Ty):
    """A configuration value such as `adam(lr = 1e-3)` or `dl2`: checked against its key's table."""

    def show(self) -> str:
        return "Option"


STRING = StringTy()


def tensor(shape: tuple[int, ...]) -> Ty:
    return REAL if shape == () else TensorTy(shape)


def shape_of(t: Ty) -> tuple[int, ...] | None:
    """The tensor shape of a numeric type (scalars are `()`), or None if not numeric."""
    if isinstance(t, TensorTy):
        return t.shape
    if t in (REAL, NAT) or isinstance(t, IndexTy):
        return ()
    return None


def is_numeric(t: Ty) -> bool:
    return shape_of(t) is not None


def is_scalar(t: Ty) -> bool:
    return shape_of(t) == ()


def broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy broadcasting of two shapes, or None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(reversed(out))
