"""Reading oVirt-shaped OVFs: the VM or template, its name and its disks.

    <ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/">
      <References>
        <File ovf:href="<imgUUID>/<volUUID>" ovf:id="<volUUID>" .../>
      </References>
      <Content xsi:type="ovf:VirtualSystem_Type">
        <Name>web01</Name>
        <TemplateId><uuid></TemplateId>   (a template's is its own id)
      </Content>
    </ovf:Envelope>

XML from storage is untrusted: parsed with defusedxml (no entities, no
external references).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from defusedxml import ElementTree

UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
HREF_RE = re.compile(rf"^({UUID})/({UUID})$")


class OvfError(Exception):
    pass


@dataclass
class Entity:
    id: str
    kind: str                 # vm, template
    name: str
    disks: list[dict[str, Any]] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(elem: Any, name: str) -> str | None:
    for key, value in elem.attrib.items():
        if _local(key) == name:
            return str(value)
    return None


def parse(entity_id: str, data: bytes) -> Entity:
    try:
        root = ElementTree.fromstring(data)
    except Exception as e:   # defusedxml raises its own and ParseError
        raise OvfError(f"{entity_id}.ovf is not valid XML: {e}") from None
    name = ""
    template_id = None
    disks = []
    for elem in root.iter():
        tag = _local(elem.tag)
        if tag == "File":
            href = _attr(elem, "href") or ""
            m = HREF_RE.match(href)
            if m:
                disks.append({"imgUUID": m.group(1).lower(), "volUUID": m.group(2).lower()})
        elif tag == "Content":
            for child in elem:
                ctag = _local(child.tag)
                if ctag == "Name" and not name:
                    name = (child.text or "").strip()
                elif ctag == "TemplateId" and template_id is None:
                    template_id = (child.text or "").strip().lower()
    kind = "template" if template_id == entity_id.lower() else "vm"
    return Entity(id=entity_id.lower(), kind=kind, name=name, disks=disks)
