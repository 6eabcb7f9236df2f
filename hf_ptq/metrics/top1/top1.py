"""Top-1 accuracy as an `evaluate` metric module shipped inside hf_ptq.

`evaluate.load("accuracy")` needs the Hub; hf_ptq loads this file from its local path instead.
Besides top-1 it returns the per-class recall and the confusion matrix when ``num_classes`` is given.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to the reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    num_classes (int, optional): when given, also return `per_class_recall` and `confusion_matrix`.
Returns:
    top1 (float): accuracy in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes=None):
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        result = {"top1": float((pred == ref).mean()) if len(ref) else float("nan")}
        if num_classes is not None:
            confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(confusion, (ref, pred), 1)
            support = confusion.sum(1)
            recall = np.divide(np.diag(confusion), support, out=np.full(num_classes, np.nan), where=support > 0)
            result["per_class_recall"] = recall.tolist()
            result["confusion_matrix"] = confusion.tolist()
        return result
