"""Datasets: download and safe extraction, the one HDF5 layout, CIFAR-10, BSDS500, stand-ins.

* :mod:`~stablenets.data.format`: the HDF5 layout every dataset ends in (``write_h5``,
  ``read_split``, ``read_attrs``) and :class:`DataError`.
* :mod:`~stablenets.data.download`: downloads refused without a checksum; archives extracted
  only after every member has been checked.
* :mod:`~stablenets.data.cifar10`, :mod:`~stablenets.data.bsds500`: the paper's datasets from
  their official archives.
* :mod:`~stablenets.data.synthetic`: offline stand-ins (a synthetic classification set, smoke
  photographs bundled with scikit-image).
* :mod:`~stablenets.data.shapes`: what a configured dataset will hold (split sizes, image size,
  classes), read from its config section alone: the config's checks compare models with it.

Needs the ``pipeline`` extra (h5py, scikit-image).
"""

from stablenets.data.bsds500 import prepare_bsds500
from stablenets.data.cifar10 import prepare_cifar10
from stablenets.data.download import download, file_digests, safe_extract, verify_checksum
from stablenets.data.format import SPLITS, DataError, read_attrs, read_split, split_size, write_h5
from stablenets.data.synthetic import (
    SMOKE_TEST_PHOTOS,
    SMOKE_TRAIN_PHOTOS,
    make_smoke_photos,
    make_synthetic_classification,
)

__all__ = [
    "SMOKE_TEST_PHOTOS",
    "SMOKE_TRAIN_PHOTOS",
    "SPLITS",
    "DataError",
    "download",
    "file_digests",
    "make_smoke_photos",
    "make_synthetic_classification",
    "prepare_bsds500",
    "prepare_cifar10",
    "read_attrs",
    "read_split",
    "safe_extract",
    "split_size",
    "verify_checksum",
    "write_h5",
]
