"""napari integration (npe2 manifest ``napari_meddiff/napari.yaml``): reader, writers, sample data, widgets.

Only imported by napari; the core package works without Qt.
"""
