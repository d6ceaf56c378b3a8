"""What a clinical team asks of a classifier beyond its AUC, one concept per module.

- calibration: do predicted probabilities match observed pneumonia rates (ECE, reliability)?
- operating_point: sensitivity/specificity at a threshold chosen on a site's validation data.
- bootstrap: percentile confidence intervals for any metric.
- cross_site: every model scored on every hospital's test data (only scores travel).
- gradcam: where in the image the model looks (MONAI Grad-CAM).
- model_card: intended use, data, training, results and failure modes as Markdown / HTML.
- personalization: a site's fine-tuned copy of the global model, and whether it helps.

Pure functions on plain data (numpy arrays, dicts, frozen dataclasses); no FLARE.
"""
