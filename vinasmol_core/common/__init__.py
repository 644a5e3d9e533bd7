"""What every part of the library shares: its errors, the artifact manifests, the names of the
pipeline's steps, SVG charts, memory figures and a process's exit."""
