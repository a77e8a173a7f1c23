"""A child saved as a Hugging Face folder its parent's class loads back (``save.py``) by the one
writer of such folders (``write.py``, also the streamed path's): the names and tensors
(``weights.py``), the config (``config.py``), an embedding scale the class derives from its
config (``embedding_scale.py``), and what they share (``common.py``)."""
from subclone_graph.export.hf.common import HFExportError, max_output_difference, quiet_transformers, tensor_outputs
from subclone_graph.export.hf.config import child_config
from subclone_graph.export.hf.save import SavedFolder, save_hf
from subclone_graph.export.hf.check import check_folder
from subclone_graph.export.hf.write import ConfigChange, Written, write_folder
from subclone_graph.export.hf.weights import child_state_dict, hf_names

__all__ = ["save_hf", "SavedFolder", "write_folder", "check_folder", "Written", "ConfigChange", "child_config", "child_state_dict", "hf_names", "HFExportError", "quiet_transformers",
           "tensor_outputs", "max_output_difference"]
