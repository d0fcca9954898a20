"""Importers: a Knative Service or an OpenFaaS stack file, as Torpor functions.

Each importer is a pure function from parsed YAML to a list of :class:`Imported` (a
``torpor.yaml`` mapping, the folder whose files ship with it, a traffic table, the
warnings) and raises :class:`ImportRefused` for a field whose meaning would change.
``torpor deploy FILE`` (``torpor.cli.imports``) then takes the normal deploy path.
"""

from torpor.importers.common import (
    Imported,
    ImportRefused,
    detect,
    load_documents,
)

__all__ = ["Imported", "ImportRefused", "detect", "load_documents"]
