#include "broker/domain/domain.hpp"

#include "broker/core/errc.hpp"
#include "broker/domain/names.hpp"

namespace broker {

std::string_view to_string(RunState s) {
  switch (s) {
    case RunState::starting: return "starting";
    case RunState::paused: return "paused";
    case RunState::running: return "running";
    case RunState::shutdown: return "shutdown";
    case RunState::stopping: return "stopping";
    case RunState::adopting: return "adopting";
    case RunState::unresponsive: return "unresponsive";
  }
  return "unknown";
}

void JobGuard::release() {
  if (d_ != nullptr) {
    d_->job_.clear();
    d_->job_target_.clear();
    d_->job_args_.clear();
    d_ = nullptr;
  }
}

Result<JobGuard> Domain::begin_job(std::string job, std::string target, boost::json::object args) {
  if (!job_.empty()) {
    return Error(make_error_code(errc::busy),
                 "domain " + name() + " is busy with '" + job_ + "'; retry when it is done");
  }
  job_ = std::move(job);
  job_target_ = std::move(target);
  job_args_ = std::move(args);
  return JobGuard(this);
}

Result<std::string> Domain::allocate_slot(const std::string& owner) {
  for (std::uint32_t i = 1; i <= spec_.pci_slots; ++i) {
    std::string slot = names::root_port(i);
    if (!slots_.contains(slot)) {
      slots_[slot] = owner;
      return slot;
    }
  }
  return Error(make_error_code(errc::wrong_state),
               "domain " + name() + " has no free PCIe root port for " + owner + " (all " +
                   std::to_string(spec_.pci_slots) + " in use)");
}

void Domain::free_slot(const std::string& slot) { slots_.erase(slot); }

std::size_t Domain::free_slots() const { return spec_.pci_slots - slots_.size(); }

bool Domain::has_device(const std::string& id) const {
  return cdroms.contains(id) || disks.contains(id) || nics.contains(id);
}

boost::json::array Domain::fdsets_to_close_json() const {
  boost::json::array out;
  for (const auto& [fdset, device] : fdsets_to_close) {
    out.push_back(boost::json::object{{"fdset", fdset}, {"device", device}});
  }
  return out;
}

boost::json::object Domain::devices_json() const {
  boost::json::object out;
  boost::json::array cds;
  for (const auto& [id, cd] : cdroms) {
    boost::json::object o{{"id", id}, {"medium", cd.path.empty() ? boost::json::value(nullptr)
                                                                 : boost::json::value(cd.path)}};
    cds.push_back(std::move(o));
  }
  boost::json::array ds;
  for (const auto& [id, d] : disks) {
    boost::json::object o{{"id", id},
                          {"path", d.spec.path},
                          {"format", to_string(d.spec.format)},
                          {"bus", to_string(d.spec.bus)},
                          {"read_only", d.spec.read_only}};
    if (!d.spec.backing.empty()) o["backing"] = d.spec.backing;
    if (d.identity.kind == fdpass::Identity::Kind::block) o["diskseq"] = d.identity.diskseq;
    ds.push_back(std::move(o));
  }
  boost::json::array ns;
  for (const auto& [id, n] : nics) {
    boost::json::object o{{"id", id}, {"tap", n.tap}};
    if (!n.spec.mac.empty()) o["mac"] = n.spec.mac;
    ns.push_back(std::move(o));
  }
  out["cdroms"] = std::move(cds);
  out["disks"] = std::move(ds);
  out["nics"] = std::move(ns);
  out["fdsets_to_close"] = fdsets_to_close_json();
  out["vnc"] = vnc ? boost::json::value(boost::json::object{{"listen", vnc->spec.listen.text()},
                                                            {"address", vnc->address}})
                   : boost::json::value(nullptr);
  return out;
}

}  // namespace broker
