#include "ctl/render.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <cstdio>
#include <ctime>

namespace qbctl {
namespace json = boost::json;
namespace {

std::string text(const json::value& v) {
  if (v.is_string()) return std::string(v.get_string());
  if (v.is_null()) return "-";
  if (v.is_bool()) return v.get_bool() ? "yes" : "no";
  return json::serialize(v);
}

const json::value& at(const json::value& o, std::string_view key) {
  static const json::value null;
  if (!o.is_object()) return null;
  auto it = o.get_object().find(key);
  return it == o.get_object().end() ? null : it->value();
}

std::string domain_text(const json::value& d) {
  std::vector<std::vector<std::string>> rows{{"name", text(at(d, "name"))},
                                             {"state", text(at(d, "state"))}};
  if (!at(d, "qemu_status").is_null()) rows.push_back({"qemu status", text(at(d, "qemu_status"))});
  for (auto [label, key] :
       {std::pair{"uid", "uid"}, std::pair{"pid", "pid"}, std::pair{"machine", "machine"},
        std::pair{"accel", "accel"}, std::pair{"memory (MiB)", "memory_mib"},
        std::pair{"vcpus", "vcpus"}, std::pair{"job", "job"}, std::pair{"console", "console"}}) {
    rows.push_back({label, text(at(d, key))});
  }
  if (at(d, "pooled").is_bool() && at(d, "pooled").get_bool()) rows.push_back({"from", "the warm pool"});
  std::string out;
  for (auto& r : rows) {
    std::string l = r[0] + ":";
    l.resize(std::max<std::size_t>(l.size() + 1, 14), ' ');
    out += l + r[1] + "\n";
  }
  const auto& dev = at(d, "devices");
  std::vector<std::vector<std::string>> devs{{"DEVICE", "ID", "DETAILS"}};
  if (at(dev, "cdroms").is_array()) {
    for (const auto& c : at(dev, "cdroms").get_array()) {
      devs.push_back({"cdrom", text(at(c, "id")), "medium " + text(at(c, "medium"))});
    }
  }
  if (at(dev, "disks").is_array()) {
    for (const auto& x : at(dev, "disks").get_array()) {
      devs.push_back(
          {"disk", text(at(x, "id")),
           text(at(x, "path")) + " " + text(at(x, "format")) + " on " + text(at(x, "bus")) +
               (at(x, "read_only").is_bool() && at(x, "read_only").get_bool() ? " read-only"
                                                                              : "")});
    }
  }
  if (at(dev, "nics").is_array()) {
    for (const auto& x : at(dev, "nics").get_array()) {
      devs.push_back({"nic", text(at(x, "id")),
                      "tap " + text(at(x, "tap")) +
                          (at(x, "mac").is_null() ? "" : " mac " + text(at(x, "mac")))});
    }
  }
  if (at(dev, "vnc").is_object()) devs.push_back({"vnc", "-", text(at(at(dev, "vnc"), "address"))});
  if (devs.size() > 1) out += "\n" + table(devs);
  return out;
}

std::string version_text(const json::value& body) {
  const auto& b = at(body, "broker");
  const auto& q = at(body, "qemu");
  std::string out = "qbrokerd " + text(at(b, "version")) + " (API " + text(at(b, "api")) + ")\n";
  out += "QEMU     " + text(at(q, "binary"));
  if (!at(q, "version").is_null()) out += ", version " + text(at(q, "version"));
  out += "\n";
  const auto& caps = at(q, "capabilities");
  if (caps.is_object()) {
    std::vector<std::vector<std::string>> rows{{"CAPABILITY", "VALUE"}};
    for (const auto& kv : caps.get_object())
      rows.push_back({std::string(kv.key()), text(kv.value())});
    out += "\n" + table(rows);
  } else if (!at(q, "note").is_null()) {
    out += "         (" + text(at(q, "note")) + ")\n";
  }
  return out;
}

std::string domains_text(const json::value& body) {
  std::vector<std::vector<std::string>> rows{
      {"NAME", "STATE", "UID", "PID", "MACHINE", "MEMORY", "VCPUS", "JOB"}};
  const auto& list = at(body, "domains");
  if (list.is_array()) {
    for (const auto& d : list.get_array()) {
      rows.push_back({text(at(d, "name")), text(at(d, "state")), text(at(d, "uid")),
                      text(at(d, "pid")), text(at(d, "machine")),
                      text(at(d, "memory_mib")) + " MiB", text(at(d, "vcpus")),
                      text(at(d, "job"))});
    }
  }
  if (rows.size() == 1) return "no domains\n";
  return table(rows);
}

std::string killed_text(const json::value& body) {
  const auto& r = at(body, "kill_report");
  double ms =
      at(r, "duration_us").is_number() ? at(r, "duration_us").to_number<double>() / 1000.0 : 0;
  char dur[32];
  std::snprintf(dur, sizeof(dur), "%.1f ms", ms);
  std::string out = "destroyed " + text(at(body, "name")) + "\n";
  std::vector<std::vector<std::string>> rows{{"uid", text(at(r, "uid"))},
                                             {"processes killed", text(at(r, "found"))},
                                             {"survivors", text(at(r, "survivors"))},
                                             {"kill rounds", text(at(r, "rounds"))},
                                             {"method", text(at(r, "method"))},
                                             {"took", dur}};
  return out + table(rows);
}

// One row per device model, then one per backend disk.
std::string xen_text(const json::value& body) {
  std::string out = "device-model uids " + text(at(body, "uid_base")) + " + domid, reaper uid " +
                    text(at(body, "reaper_uid")) + "\n";
  std::vector<std::vector<std::string>> models{
      {"DOMID", "TYPE", "UID", "PID", "STARTED BY", "SEALED", "DISKS"}};
  std::vector<std::vector<std::string>> disks{
      {"DOMID", "DEVID", "NODE", "DEVICE", "DISKSEQ", "STATE", "HELD"}};
  const auto& list = at(body, "device_models");
  for (const auto& m : list.is_array() ? list.get_array() : json::array()) {
    const auto& backends = at(m, "backends");
    const std::size_t n = backends.is_array() ? backends.get_array().size() : 0;
    models.push_back({text(at(m, "domid")), text(at(m, "type")), text(at(m, "uid")),
                      text(at(m, "pid")), text(at(m, "started_by")), text(at(m, "sealed")),
                      std::to_string(n)});
    for (const auto& b : backends.is_array() ? backends.get_array() : json::array()) {
      disks.push_back({text(at(m, "domid")), text(at(b, "devid")), text(at(b, "node")),
                       text(at(b, "physical_device")), text(at(b, "diskseq")),
                       text(at(b, "state")), text(at(b, "held"))});
    }
  }
  if (models.size() == 1) return out + "no device models\n";
  out += "\n" + table(models);
  if (disks.size() > 1) out += "\n" + table(disks);
  return out;
}

// One row per ready QEMU of each shape, then the counters.
std::string pool_text(const json::value& body) {
  const auto& shapes = at(body, "shapes");
  if (!shapes.is_array() || shapes.get_array().empty()) {
    return "no warm pool (qbrokerd --pool SHAPE keeps QEMUs of a shape spawned ahead)\n";
  }
  std::string out;
  for (const auto& s : shapes.get_array()) {
    const auto& ready = at(s, "ready");
    const std::size_t n = ready.is_array() ? ready.get_array().size() : 0;
    out += text(at(s, "shape")) + ": " + std::to_string(n) + " of " + text(at(s, "count")) +
           " ready\n";
    std::vector<std::vector<std::string>> rows{{"UID", "PID", "ACCEL", "SINCE"}};
    for (const auto& r : ready.is_array() ? ready.get_array() : json::array()) {
      rows.push_back({text(at(r, "uid")), text(at(r, "pid")), text(at(r, "accel")),
                      text(at(r, "since"))});
    }
    if (rows.size() > 1) out += table(rows);
  }
  out += "hits " + text(at(body, "hits")) + ", misses " + text(at(body, "misses")) +
         ", discarded " + text(at(body, "discarded")) + "\n";
  if (!at(body, "last_error").is_null()) out += "last error: " + text(at(body, "last_error")) + "\n";
  return out;
}

}  // namespace

std::string table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width;
  for (const auto& r : rows) {
    if (width.size() < r.size()) width.resize(r.size(), 0);
    for (std::size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      std::string cell = r[i];
      if (i + 1 < r.size()) cell.resize(width[i] + 2, ' ');
      line += cell;
    }
    out += line + "\n";
  }
  return out;
}

std::string render(const Invocation& inv, const json::value& body) {
  switch (inv.view) {
    case View::version:
      return version_text(body);
    case View::domains:
      return domains_text(body);
    case View::domain:
      return domain_text(body);
    case View::killed:
      return killed_text(body);
    case View::vnc: {
      const auto& v = at(body, "vnc");
      return "VNC of " + text(at(body, "name")) + " listens on " + text(at(v, "address")) + "\n";
    }
    case View::qmp:
      return json::serialize(at(body, "return")) + "\n";
    case View::xen:
      return xen_text(body);
    case View::pool:
      return pool_text(body);
    case View::message:
    case View::events:
    case View::text:
    case View::top:
      if (!inv.done.empty()) return inv.done + "\n";
      return json::serialize(body) + "\n";
  }
  return json::serialize(body) + "\n";
}

std::string render_event(const std::string& kind, const json::value& data) {
  std::string when = "-";
  boost::system::error_code inexact;
  const long long us = at(data, "timestamp_us").is_number()
                           ? at(data, "timestamp_us").to_number<long long>(inexact)
                           : -1;
  // A timestamp that is not a whole number of microseconds (1.5, 1e29) shows as "-".
  if (us >= 0 && !inexact) {
    std::time_t secs = static_cast<std::time_t>(us / 1000000);
    std::tm tm{};
    ::localtime_r(&secs, &tm);
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%02d:%02d:%02d.%03lld", tm.tm_hour, tm.tm_min, tm.tm_sec,
                  (us / 1000) % 1000);
    when = buf;
  }
  std::string domain = at(data, "domain").is_string() ? text(at(data, "domain")) : "-";
  std::string payload = at(data, "data").is_object() && !at(data, "data").get_object().empty()
                            ? json::serialize(at(data, "data"))
                            : "";
  std::string line = when + "  " + domain + "  " + kind + "  " + text(at(data, "name"));
  if (!payload.empty()) line += "  " + payload;
  return line + "\n";
}

std::string render_error(unsigned status, const json::value& body) {
  const auto& e = at(body, "error");
  if (!e.is_object()) return "error: HTTP " + std::to_string(status) + "\n";
  std::string out = "error: " + text(at(e, "message")) + "\n";
  if (at(e, "field").is_string()) {
    std::string field = text(at(e, "field"));
    std::string flag = flag_for_field(field);
    out += "  field: " + field + (flag.empty() ? "" : " (" + flag + ")") + "\n";
  }
  // QEMU's class, and its desc unless the message above already says it.
  const auto& q = at(e, "qmp");
  if (q.is_object()) {
    std::string desc = text(at(q, "desc"));
    bool said = !desc.empty() && text(at(e, "message")).find(desc) != std::string::npos;
    out += "  qemu:  " + text(at(q, "class")) + (said || desc.empty() ? "" : ": " + desc) + "\n";
  }
  out += "  code:  " + text(at(e, "code")) + " (HTTP " + std::to_string(status) + ")\n";
  return out;
}

int exit_code(unsigned status) {
  if (status < 300) return 0;
  switch (status) {
    case 404:
      return 3;
    case 409:
      return 4;
    case 400:
    case 405:
    case 413:
    case 415:
    case 431:
      return 5;
    case 403:
      return 6;
    case 408:
    case 504:
      return 7;
    case 501:
      return 9;
    case 502:
      return 10;
    case 503:
      return 11;
    default:
      return status >= 500 ? 1 : 5;
  }
}

std::string progress_line(double fraction, const std::string& phase, double seconds, int tick) {
  constexpr int kWidth = 24;
  std::string bar;
  char pct[16];
  if (fraction >= 0) {
    int filled = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * kWidth + 0.5);
    bar.assign(1, '[');  // appends, not "literal" + string (a g++ 12 -Wrestrict false positive)
    bar.append(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(kWidth - filled), '.');
    bar.push_back(']');
    std::snprintf(pct, sizeof(pct), "%3d%%",
                  static_cast<int>(std::clamp(fraction, 0.0, 1.0) * 100 + 0.5));
  } else {
    std::string track(kWidth, '.');
    int pos = tick % (2 * (kWidth - 3));
    if (pos >= kWidth - 3) pos = 2 * (kWidth - 3) - pos;
    track.replace(static_cast<std::size_t>(pos), 3, "###");
    bar = "[" + track + "]";
    std::snprintf(pct, sizeof(pct), "   ");
  }
  char secs[16];
  std::snprintf(secs, sizeof(secs), "%.1fs", seconds);
  return bar + " " + pct + "  " + (phase.empty() ? "working" : phase) + "  " + secs;
}

}  // namespace qbctl
