"""Where and how calibration runs: the device (``device.py``), data-parallel ranks
(``distributed.py``) and the segment-by-segment runner (``segments.py``)."""
