"""Labelled picture grids a reader can read, drawn with PIL (a torchvision dependency): every cell
or row says what it is. Nothing here knows about distillation.

    class_rows(images, rows, class_names, path)       # one row per class, its name at the row start
    captioned_grid(images, captions, path)            # a grid with a caption under every cell
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 64  # pixels per image cell (images are upscaled with nearest neighbour)
PAD = 4
LINE = 12  # caption line height of PIL's default bitmap font


def _to_pil(image, cell=CELL):
    """uint8 (C, H, W) tensor -> RGB PIL image of cell x cell."""
    array = image.detach().cpu()
    if array.shape[0] == 1:
        array = array.repeat(3, 1, 1)
    pil = Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()), "RGB")
    return pil.resize((cell, cell), Image.NEAREST)


def _font():
    return ImageFont.load_default()


def captioned_grid(images, captions, path, columns=8, cell=CELL):
    """images: uint8 (N, C, H, W); captions: N strings (up to two lines, '\\n'-separated, ~9
    characters each)."""
    n = len(images)
    rows = max(1, -(-n // columns))
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    step_x, step_y = cell + PAD, cell + PAD + LINE * lines
    canvas = Image.new("RGB", (PAD + columns * step_x, PAD + rows * step_y), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for i in range(n):
        x, y = PAD + (i % columns) * step_x, PAD + (i // columns) * step_y
        canvas.paste(_to_pil(images[i], cell), (x, y))
        for k, text in enumerate(captions[i].split("\n")):
            draw.text((x, y + cell + k * LINE), text[: cell // 6], fill="black", font=font)
    canvas.save(path)
    return path


def class_rows(images, row_labels, class_names, path, cell=CELL, title=None):
    """images: uint8 (R * K, C, H, W), K images per row; row_labels: R class indices; the class name
    (and index) at the start of each row. An empty row (a class with no image) is drawn as a
    labelled gap."""
    per_row = len(images) // max(1, len(row_labels))
    names = [f"{c} {class_names[c] if class_names else ''}".strip() for c in row_labels]
    margin = PAD + 6 * max((len(s) for s in names), default=1) + PAD
    top = LINE + PAD if title else 0
    canvas = Image.new(
        "RGB",
        (margin + per_row * (cell + PAD), top + PAD + len(row_labels) * (cell + PAD)),
        "white",
    )
    draw, font = ImageDraw.Draw(canvas), _font()
    if title:
        draw.text((PAD, PAD // 2), title, fill="black", font=font)
    for r, name in enumerate(names):
        y = top + PAD + r * (cell + PAD)
        draw.text((PAD, y + cell // 2 - LINE // 2), name, fill="black", font=font)
        for k in range(per_row):
            canvas.paste(_to_pil(images[r * per_row + k], cell), (margin + k * (cell + PAD), y))
    canvas.save(path)
    return path


def histogram_plot(counts, class_names, path, title):
    """A bar chart of per-class counts (matplotlib, optional): returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [class_names[i] if class_names else str(i) for i in range(len(counts))]
    ax.bar(range(len(counts)), counts, color="tab:blue")
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
