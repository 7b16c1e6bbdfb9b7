"""How many CPU threads torch uses: by default one per physical core (torch's own choice, best on an idle
machine); fewer where other work shares the cores, since OpenMP threads that wait for a busy core spin instead
of sleeping (on a busy 2-core machine one thread drew 3× faster than two)."""

from __future__ import annotations


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to `threads` (None: leave torch's default, the physical cores); returns the
    count in use."""
    import torch  # here, not at import: the CLI's --help stays fast

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}; pass at least 1 (or leave it out for one per physical core).")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
