// Request values in one call, for tests and benchmarks.
#pragma once

#include <string>
#include <utility>

#include "broker/domain/requests.hpp"

namespace qbtest {

// A disk for add_disk: raw on SCSI, read-write, no backing file unless said otherwise.
inline broker::DiskSpec disk(std::string id, std::string path,
                             broker::DiskFormat f = broker::DiskFormat::raw,
                             broker::DiskBus bus = broker::DiskBus::scsi, bool ro = false,
                             std::string backing = {}) {
  broker::DiskSpec s;
  s.id = std::move(id);
  s.path = std::move(path);
  s.format = f;
  s.bus = bus;
  s.read_only = ro;
  s.backing = std::move(backing);
  return s;
}

// A VNC listener at `listen` ("127.0.0.1:0", "unix:/path"), which must be valid.
inline broker::VncSpec vnc(const std::string& listen) {
  return broker::VncSpec{broker::VncListen::parse(listen).value()};
}

}  // namespace qbtest
