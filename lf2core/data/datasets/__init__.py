"""Person re-id dataset formats: parse a dataset root into train / query / gallery lists of samples.

Formats (``load(name, root)``; the layouts are documented for users in ``docs/data.md``):

- ``market1501``: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` holding images named
  ``0002_c1s1_000451_00.jpg`` (pid, camera, sequence, frame, box).
- ``dukemtmc``: the same folders, images named ``0005_c2_f0046985.jpg`` (pid, camera, frame).
- ``msmt17``: MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) and ``list_{train,val,query,gallery}.txt`` (lines
  ``relative/path.jpg label``); train = list_train + list_val; the camera is the file name's 3rd field.
- ``folder``: a generic layout, ``root/{train,query,gallery}/<identity>/<image>`` with the camera taken from
  a ``c<digits>`` token of the file name (camera 0 when there is none), or a CSV ``root/manifest.csv`` with
  columns ``split,path,pid,camid``. Train images without an identity (an image directly in ``train/``, a
  ``train`` CSV row with an empty pid) are unlabelled: pid ``UNLABELLED`` (an unlabelled target domain).

Conventions shared by every format: pid -1 (junk) is dropped; pid 0 (Market/Duke distractors) is kept;
pid ``UNLABELLED`` (-2) marks a train image without an identity (``folder`` format only);
camids are 0-based (``c1`` -> 0); sample paths are absolute local paths; lists are sorted by file name
(folder formats) or kept in list-file order (MSMT17, CSV). Parsing lists directories and file names but
never opens an image; ``check_main`` (``lf2 data check``) does.

A root given as ``s3://bucket/prefix`` is first made local with ``lf2core.storage.local_path``. A root
holding exactly one sub-folder with the expected layout (what unzipping an archive usually gives, e.g.
``market/Market-1501-v15.09.15/``) is accepted too.

The package: ``samples`` (``Sample``, ``Splits``, statistics, labels), ``layout`` (what the parsers share),
one module per format family (``market``: Market-1501 and DukeMTMC; ``msmt``; ``folder``), ``loading``
(``load``, ``detect_format``) and ``check`` (``lf2 data check``).
"""

from .check import check_image, check_main, format_stats_table
from .folder import FOLDER_CSV, FOLDER_CSV_COLUMNS, folder_camera
from .loading import detect_format, load
from .market import MARKET_FOLDERS
from .msmt import MSMT_IMAGE_DIRS, MSMT_LISTS
from .samples import (FORMATS, IMAGE_EXTENSIONS, REQUIRED_SPLITS, SPLIT_NAMES, UNLABELLED, Sample, Splits,
                      count_unlabelled, relabel, role_problems, split_stats)

__all__ = [
    "FOLDER_CSV", "FOLDER_CSV_COLUMNS", "FORMATS", "IMAGE_EXTENSIONS", "MARKET_FOLDERS", "MSMT_IMAGE_DIRS",
    "MSMT_LISTS", "REQUIRED_SPLITS", "SPLIT_NAMES", "UNLABELLED", "Sample", "Splits", "check_image", "check_main",
    "count_unlabelled", "detect_format", "folder_camera", "format_stats_table", "load", "relabel", "role_problems",
    "split_stats",
]
