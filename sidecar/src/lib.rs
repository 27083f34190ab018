//! The pingora sidecar. Empty until the sidecar issue (#3) lands; it claims nothing yet.
