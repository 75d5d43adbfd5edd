"""Images as a model is shown them: opened and verified without decoding pixels (a file cut
short or no image is named before any model loads), decoded upright (EXIF orientation applied),
in RGB (transparency on white, 16-bit grey scaled), resized to whole visual tokens."""

import io
import warnings
from pathlib import Path

import numpy
from PIL import Image, UnidentifiedImageError
from qwen_vl_utils import smart_resize

PATCH_FACTOR = 28  # one LLM token per 28x28 pixels (14-pixel patches, merged 2x2); Qwen3-VL: 32
MIN_PIXELS, MAX_PIXELS = 3136, 401408  # the paper's: at least 4, at most 512 visual tokens


def fitted_size(width, height, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """(width, height) after resizing: aspect kept, sides multiples of `factor` (a visual
    token's side), area in [min, max]."""
    try:
        height, width = smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError as e:  # e.g. a side over 200 times the other: the processor's limit
        raise ValueError(f"a {width}x{height} image is not one the model takes ({e})") from e
    return width, height


def image_tokens(width, height, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """How many visual tokens the model sees for an image of this size."""
    width, height = fitted_size(width, height, min_pixels, max_pixels, factor)
    return (width // factor) * (height // factor)


def fit_image(image, min_pixels, max_pixels, factor=PATCH_FACTOR):
    """RGB (`to_rgb`), resized as `fitted_size` says."""
    image = to_rgb(image)
    size = fitted_size(image.width, image.height, min_pixels, max_pixels, factor)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


SIXTEEN_BITS = ("I;16", "I;16L", "I;16B", "I;16N")  # grey, 0-65535


def to_rgb(image):
    """RGB as the model takes it: transparent pixels on white (as qwen_vl_utils shows an RGBA
    image; the colour hidden under them is no part of the picture), 16-bit grey scaled to 8
    bits (PIL's own conversion clips it: all but the darkest 1/256 of the range turns white)."""
    if image.mode in SIXTEEN_BITS or image.mode == "I":  # "I": a 16-bit PNG (verified_size)
        grey = numpy.asarray(image).astype(numpy.int64).clip(0, 65535) // 257
        return Image.fromarray(grey.astype(numpy.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image.convert("RGB")


def _stored(value):
    """What a dataset stores for an image as bytes or a Path: raw bytes, {'bytes': ...} or
    {'path': ...}, or a file path; a PIL image as it is."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = Path(value)
    if not isinstance(value, (Path, bytes, bytearray, Image.Image)):
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    return value


def _missing(path):
    """Why the file `path` is not there, with what the user more likely meant."""
    if path.is_dir():
        return f"image {str(path)!r} is a directory"
    if path.is_symlink():
        return f"image {str(path)!r} is a link to {str(path.readlink())!r}, which does not exist"
    why = f"image {str(path)!r} does not exist"
    if "\\" in str(path) and Path(str(path).replace("\\", "/")).is_file():
        why += " (a Windows path? write it with / between folders)"
    return why


def open_image(value):
    """A PIL image, not yet decoded, from what a dataset stores (`_stored`)."""
    value = _stored(value)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Path) and not value.is_file():
        raise ValueError(_missing(value))
    try:
        with warnings.catch_warnings():  # the model sees at most --max_pixels of any image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(value if isinstance(value, Path) else io.BytesIO(value))
    except Image.DecompressionBombError as e:
        raise ValueError(f"the image cannot be read ({e} Pillow opens no larger image: "
                         "downscale it; the model sees at most --max_pixels of it)") from e
    except UnidentifiedImageError as e:  # PIL's message names a BytesIO object, not the file
        what = "an empty file" if _size(value) == 0 else "not an image file Pillow knows"
        raise ValueError(f"the image cannot be read ({what})") from e
    except Exception as e:  # the image library's errors
        raise ValueError(f"the image cannot be read ({e})") from e


def _size(value):
    return value.stat().st_size if isinstance(value, Path) else len(value)


ORIENTATION = 0x0112  # EXIF: how the stored pixels turn upright


UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # as PIL.ImageOps.exif_transpose turns them


def orientation(image):
    """The EXIF orientation (1-8; 1 when none) of an opened image, read without decoding it:
    a phone stores a portrait photo as landscape pixels and this tag, which every viewer
    applies (and datasets' and transformers' image loaders: the model is shown the photo as a
    person sees it, and a box is in that frame). A PNG's eXIf chunk counts when it comes
    before the pixels (as the PNG specification puts it), the only place read without
    decoding them."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": then no orientation
            value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is metadata the image does without
        return 1
    return value if value in UPRIGHT else 1


def upright(image, turn):
    """`image` turned as its EXIF orientation `turn` says, the tag dropped (so never turned
    twice)."""
    if turn not in UPRIGHT:
        return image
    turned = image.transpose(UPRIGHT[turn])
    turned.info.pop("exif", None)
    return turned


def upright_size(size, turn):
    """(width, height) of an image of `size` once turned upright."""
    return tuple(reversed(size)) if turn in (5, 6, 7, 8) else tuple(size)


def decode_image(value):
    """The image decoded, upright (its EXIF orientation applied)."""
    image = open_image(value)
    try:
        image.load()
    except Exception as e:  # the image library's errors, a truncated file's among them
        raise ValueError(f"the image cannot be read ({e})") from e
    turn = orientation(image)
    if getattr(image, "n_frames", 1) > 1:  # an animation keeps its file open: its first
        first = image.copy()               # frame is the picture
        image.close()
        image = first
    return upright(image, turn)


def verified_size(value):
    """(width, height) of a stored image, upright, checked to be a readable image the model
    can be shown: a PNG's chunks verified, a JPEG's end found (decoded at 1/8 scale where it is
    not), other formats (rare in datasets) decoded."""
    image = open_image(value)
    size = upright_size(image.size, orientation(image))
    if isinstance(value, Image.Image):
        return size
    with image:  # closes its file
        if image.mode in ("I", "F") and not (image.mode == "I" and image.format == "PNG"):
            kind = "integers" if image.mode == "I" else "floating-point numbers"
            raise ValueError(f"the image holds 32-bit {kind} (mode {image.mode}), whose range "
                             "of values is unknown: save it with 8 or 16 bits a channel")
        jpeg = image.format in ("JPEG", "MPO")
        try:
            if image.format == "PNG":
                image.verify()  # reads the file through: truncated or corrupt data fails here
            elif not (jpeg and _last_bytes(_stored(value)) == b"\xff\xd9"):
                # A JPEG's data ends with its EOI marker (FF D9, never inside the coded data):
                # one that does not end so is cut short, or has bytes after its end (a motion
                # photo's video): decoding tells which. PIL's verify() checks no other format.
                if jpeg:
                    image.draft(image.mode, (1, 1))  # at 1/8 scale: a fraction of the work
                image.load()
        except Exception as e:
            raise ValueError(f"the image cannot be read ({e})") from e
    return size


def _last_bytes(value):
    if isinstance(value, Path):
        with open(value, "rb") as f:
            f.seek(max(0, value.stat().st_size - 2))
            return f.read(2)
    return bytes(value[-2:])


def turned_note(value):
    """What to add to a box's error where the image is turned upright by its EXIF orientation:
    the box may be in the stored pixels' frame."""
    image = open_image(value)
    turn, (width, height) = orientation(image), image.size
    if image is not value:  # opened here
        image.close()
    if turn == 1:
        return ""
    return (f" as shown, upright: its EXIF orientation {turn} turns the {width}x{height} pixels "
            "stored (boxes are in the frame a viewer shows)")
