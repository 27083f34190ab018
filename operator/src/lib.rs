//! The MallDeployment operator. Empty until the operator issue (#4) lands; it claims nothing yet.
