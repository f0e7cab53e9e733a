"""Parameter fields shared by many verbs."""

from rpc.schema import UUID, Field

JOB_UUID = Field("jobUUID", UUID(), description="Client-chosen job id; resubmitting it returns "
                 "the existing job")
SD_UUID = Field("sdUUID", UUID(), description="Storage domain id")
IMG_UUID = Field("imgUUID", UUID(), description="Image (disk) id")
VOL_UUID = Field("volUUID", UUID(), description="Volume id")

JOB_RESULT = {"type": "object", "properties": {"jobUUID": {"type": "string"}},
              "required": ["jobUUID"]}
