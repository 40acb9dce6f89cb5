"""The demo's image grid, labelled so the PNG explains itself: a title, column headers, the prompt
(and seed) of each row, the uncached and the cached image side by side, and their PSNR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Side of an image cell in pixels (small images are scaled up, large ones down, to about this).
CELL = 128
LABEL_WIDTH = 240
PSNR_WIDTH = 110
PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor, side: int) -> Any:
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array)
    h, w = array.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return picture.resize(size, resample)


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap measured in pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        words = paragraph.split()
        line = ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def labelled_grid(
    uncached: torch.Tensor,
    cached: torch.Tensor,
    row_labels: Sequence[str],
    psnr_db: Sequence[float],
    *,
    title: Sequence[str],
    headers: tuple[str, str] = ("uncached", "cached"),
) -> Any:
    """A PIL image: one row per (prompt, seed), columns label | uncached | cached | PSNR."""
    from PIL import Image, ImageDraw

    if not (len(uncached) == len(cached) == len(row_labels) == len(psnr_db)):
        raise ValueError("labelled_grid needs one label and one PSNR per image pair")
    text_font, head_font, title_font = _font(14), _font(15), _font(16)
    side = CELL
    tiles = [(_to_pil(u, side), _to_pil(c, side)) for u, c in zip(uncached, cached, strict=True)]
    cell_h = max([side, *(t[0].height for t in tiles)])
    cell_w = max([side, *(t[0].width for t in tiles)])
    line_h = 20
    title_lines = [line for text in title for line in _wrap(text, title_font, LABEL_WIDTH + 2 * cell_w + PSNR_WIDTH)]
    top = PAD + line_h * len(title_lines) + PAD
    header_h = line_h + PAD
    width = PAD + LABEL_WIDTH + PAD + cell_w + PAD + cell_w + PAD + PSNR_WIDTH + PAD
    height = top + header_h + len(tiles) * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=INK, font=title_font)
    x_label, x_left = PAD, PAD + LABEL_WIDTH + PAD
    x_right = x_left + cell_w + PAD
    x_psnr = x_right + cell_w + PAD
    for x, text in ((x_label, "prompt (seed)"), (x_left, headers[0]), (x_right, headers[1]), (x_psnr, "PSNR")):
        draw.text((x, top), text, fill=INK, font=head_font)
    y = top + header_h
    for (left, right), label, value in zip(tiles, row_labels, psnr_db, strict=True):
        for j, line in enumerate(_wrap(label, text_font, LABEL_WIDTH)[: max(1, cell_h // line_h)]):
            draw.text((x_label, y + j * line_h), line, fill=MUTED, font=text_font)
        canvas.paste(left, (x_left, y))
        canvas.paste(right, (x_right, y))
        draw.text((x_psnr, y + cell_h // 2 - line_h // 2), f"{value:.1f} dB", fill=INK, font=text_font)
        y += cell_h + PAD
    return canvas
