"""captool.evaluation: caption a dataset split with a bundle or a checkpoint and score it (BLEU, CIDEr-D, facts)."""

from .evaluate import (EvalReport, EvalSet, Sampler, evaluate, is_bundle, load_eval_set, open_model, score_captions,
                       write_predictions)

__all__ = ["EvalReport", "EvalSet", "Sampler", "evaluate", "is_bundle", "load_eval_set", "open_model",
           "score_captions", "write_predictions"]
