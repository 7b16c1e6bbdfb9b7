"""The native-size rule: what a model actually draws when it is asked for a size far above the one it learned.

A1111 clients and PNGs ask for 512×512 by habit; a model trained at 64×64 (the default) spends minutes on noise at
that size. One rule, used by the CLI, both server APIs and the UI: a request whose width or height is more than
`MAX_UPSCALE` times the model's native side is drawn at the native size (the longer side becomes the native side,
the aspect ratio kept, both sides multiples of the VAE factor) and resized up to the requested size. The PNG
records the requested size and `Drawn at: WxH`, so `generate --from` redoes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_UPSCALE = 2  # sides up to twice the native side are drawn as asked (a model copes with that much)


@dataclass(frozen=True)
class SizePlan:
    width: int  # the size asked for: the images' final size
    height: int
    draw_width: int  # the size the model draws at
    draw_height: int

    @property
    def resized(self) -> bool:
        return (self.draw_width, self.draw_height) != (self.width, self.height)

    @property
    def drawn_at(self) -> str | None:
        """`WxH` when the model draws smaller than asked (what the PNG records as `Drawn at`), else None."""
        return f"{self.draw_width}x{self.draw_height}" if self.resized else None

    def note(self, native: int) -> str | None:
        """One sentence for a person, or None when the size is drawn as asked."""
        if not self.resized:
            return None
        return (f"{self.width}x{self.height} is over {MAX_UPSCALE}× this model's native {native}x{native}: drawn at "
                f"{self.drawn_at} and resized up.")


def plan_size(width: int, height: int, native: int, factor: int) -> SizePlan:
    """The size to draw `width` × `height` at on a model of native side `native` whose VAE needs multiples of
    `factor`; see the module's docstring for the rule."""
    if max(width, height) <= MAX_UPSCALE * native:
        return SizePlan(width, height, width, height)
    scale = native / max(width, height)

    def side(value: int) -> int:
        return max(factor, round(value * scale / factor) * factor)

    return SizePlan(width, height, side(width), side(height))
