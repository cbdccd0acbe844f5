"""A reward function in verl's `compute_score` form, used by examples/from_verl.yaml unchanged.

verl calls it per sample with the dataset's `data_source`, the decoded response, `reward_model.
ground_truth` and `extra_info`; Flux passes the same from the record (a record without
`reward_model` gives its `answer` as the ground truth), and logs a returned dict's extra numbers.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    right = sum(a == b for a, b in zip(solution_str.strip(), ground_truth))
    return {"score": right / len(ground_truth), "exact": float(solution_str.strip() == ground_truth)}
