"""dentfuse fusion: volumes and surface scans from data, rigid registration, quality
gates, DICOM/research outputs and QA pictures. No sockets, no database.

Import submodules explicitly; this package's ``__init__`` stays light so that
``fusion.records`` can be used without SimpleITK or trimesh.
"""
