"""Sound event detection metrics of DCASE task 4 (a local, offline `evaluate` module): intersection-based F1,
collar-based F1 and segment-based F1, computed by `htsat_hf.metrics.sed_metrics`."""

import datasets
import evaluate

from htsat_hf.metrics.sed_metrics import compute_sed_metrics

_DESCRIPTION = """
One example = one audio file: its detected events (`predictions`) and its reference events (`references`), each a
list of {"onset", "offset", "event_label"} in seconds (an empty list = no events). Metrics (fractions in [0, 1]):
intersection_f1 (psds_eval macro F1, DTC = GTC = 0.5, CTTC = 0.3), collar_f1 / collar_f1_micro (200 ms onset collar,
offset collar max(200 ms, 20 % of the reference length), optimal matching), segment_f1 / segment_f1_micro (1-s
segments), and `<metric>/<class>` per class when `per_class=True`.
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `dict`): per file, the detected events {"onset", "offset", "event_label"}.
    references (`list` of `list` of `dict`): per file, the reference events (same keys).
    filenames (`list` of `str`, optional): a name per example (default: its index).
    durations (`list` of `float`, optional): the duration of each file in seconds.
    labels (`list` of `str`, optional): the class set (default: the reference labels); other labels are an error.
    per_class (`bool`, False): also return per-class F1.
Returns:
    intersection_f1, collar_f1, collar_f1_micro, segment_f1, segment_f1_micro (`float`).
Example:
    >>> sed = evaluate.load("path/to/metrics/sed")
    >>> sed.compute(predictions=[[{"onset": 1.0, "offset": 3.0, "event_label": "Dog"}]],
    ...             references=[[{"onset": 1.1, "offset": 3.1, "event_label": "Dog"}]])["collar_f1"]
    1.0
"""
_CITATION = """
@inproceedings{bilen2020framework,
  title={A Framework for the Robust Evaluation of Sound Event Detection},
  author={Bilen, Cagdas and Ferroni, Giacomo and Tuveri, Francesco and Azcarreta, Juan and Krstulovic, Sacha},
  booktitle={ICASSP}, year={2020}
}
@article{mesaros2016metrics,
  title={Metrics for Polyphonic Sound Event Detection},
  author={Mesaros, Annamaria and Heittola, Toni and Virtanen, Tuomas},
  journal={Applied Sciences}, volume={6}, number={6}, pages={162}, year={2016}
}
"""

_EVENT = {
    "onset": datasets.Value("float64"),
    "offset": datasets.Value("float64"),
    "event_label": datasets.Value("string"),
}


def _events_of(example) -> list:
    """A file's events as a list of dicts (datasets may hand over a dict of lists)."""
    if isinstance(example, dict):
        return [dict(zip(example, values)) for values in zip(*example.values())]
    return list(example or [])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sed(evaluate.Metric):
    def _info(self):
        events = datasets.List(_EVENT) if hasattr(datasets, "List") else datasets.Sequence(_EVENT)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": events, "references": events}),
            reference_urls=["https://github.com/DCASE-REPO/psds_eval", "https://github.com/TUT-ARG/sed_eval"],
        )

    def _compute(self, predictions, references, filenames=None, durations=None, labels=None, per_class=False):
        if filenames is None:
            filenames = [str(i) for i in range(len(references))]
        if len(filenames) != len(references) or (durations is not None and len(durations) != len(references)):
            raise ValueError("filenames and durations need one entry per example.")
        truth, detected = [], []
        for name, reference, prediction in zip(filenames, references, predictions):
            reference_events = _events_of(reference)
            truth += [{"filename": name, **e} for e in reference_events] or [
                {"filename": name, "onset": None, "offset": None, "event_label": None}
            ]
            detected += [{"filename": name, **e} for e in _events_of(prediction)]
        duration_of = dict(zip(filenames, map(float, durations))) if durations is not None else None
        return compute_sed_metrics(truth, detected, duration_of, labels=labels, per_class=per_class)
