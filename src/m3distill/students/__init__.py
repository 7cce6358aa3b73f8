"""Students: layer plans and layer-reduced copies of the teacher."""
