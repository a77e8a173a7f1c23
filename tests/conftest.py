"""Test session settings.

- One intra-op thread (tiny models run faster without thread overhead), in the test processes
  and in every process a test starts (``OMP_NUM_THREADS``: a CLI subprocess, two torchrun ranks),
  so that one worker's process does not take the other worker's core.
- Under pytest-xdist's default ``--dist load`` (``-n auto``), the tests of one model — those whose
  parametrization names a model of ``models`` — go to one worker together, so that a worker
  traces each model once for all of them (traced parents are cached per process:
  ``subclone_testing.traced``/``family``) rather than every worker tracing every model. Every
  other test is its own unit, handed out one by one as ``load`` does. (``--dist loadgroup`` with
  ``xdist_group`` marks would say the same, but xdist 3.8 renames node ids through an attribute
  pytest 9 no longer reads, so its groups are silently ignored.)
"""
import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")     # the Rust tokenizers' own thread pool

import torch  # noqa: E402
# transformers registers its output classes with torch's pytree when they are defined, but not
# while torch.export runs: a test whose traced forward imports transformers lazily would
# otherwise leave them unregistered for every later test in the process (tracing.tensor_outputs)
import transformers.modeling_outputs  # noqa: E402,F401

torch.set_num_threads(1)

_PARAMETERS = re.compile(r"\[(.+)\]$")


def _model_names() -> frozenset:
    from subclone_graph.models import MODEL_NAMES, hf_families

    return frozenset(MODEL_NAMES) | frozenset(hf_families.FAMILIES)


def model_of(nodeid: str, names) -> str | None:
    """The model a test is parametrized by (``test_x[llama-bfloat16]`` → ``llama``), or None."""
    match = _PARAMETERS.search(nodeid)
    return next((p for p in match.group(1).split("-") if p in names), None) if match else None


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    names = _model_names()

    class ByModel(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            model = model_of(nodeid, names)
            return f"model:{model}" if model else nodeid

    return ByModel(config, log)
