"""dentfuse DICOM node: listener (C-ECHO, C-STORE), durable storage, index, stability,
forwarding to PACS and retrieval of priors. Knows nothing of fusion."""
