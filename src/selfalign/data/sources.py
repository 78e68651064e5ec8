"""Image sources for latent caching: a class-folder tree on disk, or the same tree inside a zip.

Accepted layouts (the label of an image is its first-level folder, sorted by name):

* ImageNet: ``train/<wnid>/*.JPEG`` -- pass ``.../train``, or the folder that holds ``train/``
  (and ``val/``): the ``train`` split is chosen.
* any ImageFolder: ``<class>/**/<image>``;
* a folder of images without class folders: one class named after the folder;
* a ``.zip`` of any of these (a single wrapping folder inside the zip is skipped).

The listing is sorted, so it -- and everything derived from it, like shard contents -- depends
only on the files, never on the file system's order or on how many processes read it.
"""
from __future__ import annotations

import io
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import DataError
from .transforms import center_crop_arr

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
SPLIT_NAMES = {"train", "val", "validation", "test"}


@dataclass(frozen=True)
class SourceListing:
    """The sorted images of a source: ``paths[i]`` (relative, posix) has label ``labels[i]``."""

    root: str                   # absolute path of the folder or zip
    prefix: str                 # folder inside the root where the classes live ("" or "train/")
    paths: tuple[str, ...]      # relative to root/prefix
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not PurePosixPath(name).name.startswith(".")


def _files_of(root: Path) -> list[str]:
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"input {str(root)!r} is a file but not a zip archive; pass a folder of "
                            f"class folders or a .zip of one")
        with zipfile.ZipFile(root) as archive:
            return [n for n in archive.namelist()
                    if not n.endswith("/") and not n.startswith("__MACOSX/") and _is_image(n)]
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).as_posix()
        files.extend(n if rel == "." else f"{rel}/{n}" for n in names if _is_image(n))
    return files


def _choose_prefix(files: list[str]) -> str:
    """Skip wrapping folders and pick the ``train`` split of an ImageNet-style tree."""
    prefix = ""
    while True:
        parts = [f[len(prefix):].split("/") for f in files if f.startswith(prefix)]
        tops = {p[0] for p in parts if len(p) > 1}
        top_files = any(len(p) == 1 for p in parts)
        if top_files or not tops:
            return prefix
        if "train" in tops and tops <= SPLIT_NAMES:
            return prefix + "train/"
        # One folder holding folders of images (zip/archive/ or ILSVRC/...): descend.
        if len(tops) == 1 and all(len(p) >= 3 for p in parts):
            prefix += parts[0][0] + "/"
            continue
        return prefix


def list_images(root: str | os.PathLike) -> SourceListing:
    """List a folder or zip of class folders; one clear error when it holds no images."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"input {str(root)!r} does not exist; pass a folder of class folders "
                        f"(e.g. ImageNet's train/) or a .zip of one")
    files = _files_of(path)
    if not files:
        raise DataError(f"input {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    prefix = _choose_prefix(files)
    rel = sorted(f[len(prefix):] for f in files if f.startswith(prefix))
    if any("/" in f for f in rel):
        # ImageFolder semantics: images directly under the root are not in any class.
        rel = [f for f in rel if "/" in f]
        class_names = sorted({f.split("/", 1)[0] for f in rel})
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = [lookup[f.split("/", 1)[0]] for f in rel]
    else:
        class_names = [PurePosixPath(prefix.rstrip("/")).name or path.stem]
        labels = [0] * len(rel)
    return SourceListing(str(path.resolve()), prefix, tuple(rel), tuple(labels), tuple(class_names))


class ImageReader:
    """Reads (and center-crops) images of a listing; safe to use from DataLoader workers.

    Zip archives are opened lazily, once per process and thread, because a ``ZipFile`` handle
    must not be shared across forked workers.
    """

    def __init__(self, root: str, prefix: str = ""):
        self.root = root
        self.prefix = prefix
        self._local = threading.local()

    def __getstate__(self):
        return {"root": self.root, "prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["root"], state["prefix"])

    @classmethod
    def of(cls, listing: SourceListing) -> "ImageReader":
        return cls(listing.root, listing.prefix)

    def _archive(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            self._local.archive = zipfile.ZipFile(self.root)
            self._local.pid = pid
        return self._local.archive

    def open(self, rel: str) -> Image.Image:
        """The RGB image at ``rel``; raises ``OSError``/``ValueError`` for unreadable files."""
        if self.root.lower().endswith(".zip"):
            data = self._archive().read(self.prefix + rel)
            image = Image.open(io.BytesIO(data))
        else:
            image = Image.open(os.path.join(self.root, self.prefix, rel))
        image.load()            # decode now: truncated or corrupt files fail here, not later
        return image.convert("RGB")

    def read_cropped(self, rel: str, image_size: int) -> np.ndarray:
        """ADM center crop to ``image_size``: uint8 ``(H, W, 3)``."""
        return np.asarray(center_crop_arr(self.open(rel), image_size), dtype=np.uint8)
