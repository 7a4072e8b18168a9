"""lungscreen: screen chest X-ray and CT images for COVID-19 and pneumonia-like disease.

The package is laid out as the data flows: ``io`` and ``data`` (reading images, one manifest over many
public sources) -> ``preprocessing`` and ``lungs`` (bias-removing intensity steps, lung segmentation) ->
``models`` (one registry for every paper's network) -> ``training`` -> ``evaluation`` -> ``inference``.
"""

__version__ = "0.1.0"
