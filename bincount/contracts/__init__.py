"""The seams: specs, records, errors, job naming and the backend Protocols. Imports nothing else of the project."""
