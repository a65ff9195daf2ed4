#include "broker/domain/cold_plan.hpp"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <optional>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include "broker/core/errc.hpp"
#include "broker/domain/names.hpp"

namespace broker {
namespace json = boost::json;

namespace {

Error unplannable(std::string_view what) {
  return Error(make_error_code(errc::internal),
               std::string(what) + " cannot be planned before QEMU starts");
}

std::string string_arg(const json::object& args, std::string_view key) {
  const auto* v = args.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}

// The medium of a blockdev-change-medium: /dev/fdset/N through `file`, or a json: filename
// naming the protocol driver over /dev/fdset/N (host_device, host_cdrom for block devices).
struct MediumFile {
  std::string driver;
  std::string fdset;
};
std::optional<MediumFile> medium_file(const std::string& filename) {
  auto is_fdset = [](std::string_view f) {
    constexpr std::string_view prefix = "/dev/fdset/";
    return f.size() > prefix.size() && f.starts_with(prefix) &&
           std::all_of(f.begin() + prefix.size(), f.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  };
  if (is_fdset(filename)) return MediumFile{"file", filename};
  constexpr std::string_view json_prefix = "json:";
  if (!filename.starts_with(json_prefix)) return std::nullopt;
  boost::system::error_code ec;
  const json::value v = json::parse(std::string_view(filename).substr(json_prefix.size()), ec);
  const auto* file = ec || !v.is_object() ? nullptr : v.as_object().if_contains("file");
  if (file == nullptr || !file->is_object() || v.as_object().size() != 1) return std::nullopt;
  const std::string driver = string_arg(file->as_object(), "driver");
  const std::string name = string_arg(file->as_object(), "filename");
  if (file->as_object().size() != 2 || !is_fdset(name) ||
      (driver != "file" && driver != "host_device" && driver != "host_cdrom")) {
    return std::nullopt;
  }
  return MediumFile{driver, name};
}

}  // namespace

Result<void> ColdPlan::add(const qmp::Command& c) {
  if (c.name == "blockdev-add") {
    drives_.push_back("-blockdev");
    drives_.push_back(json::serialize(c.args));
    return {};
  }
  if (c.name == "device_add") {
    devices_.push_back(c.args);
    return {};
  }
  if (c.name == "blockdev-change-medium") {
    const std::string id = string_arg(c.args, "id");
    const auto file = medium_file(string_arg(c.args, "filename"));
    const auto* ro = c.args.if_contains("read-only-mode");
    if (string_arg(c.args, "format") != "raw" || !file || ro == nullptr || !ro->is_string() ||
        ro->as_string() != "read-only") {
      return unplannable("a medium other than a read-only raw fdset");
    }
    auto device = std::find_if(devices_.begin(), devices_.end(), [&](const json::object& d) {
      return string_arg(d, "id") == id;
    });
    if (device == devices_.end() || device->contains("drive")) {
      return unplannable("a medium for CD drive '" + id + "', which has no empty planned drive,");
    }
    const std::string drive = names::medium_drive(id);
    drives_.push_back("-drive");
    drives_.push_back("if=none,id=" + drive + ",file.driver=" + file->driver +
                      ",file.filename=" + file->fdset + ",format=raw,readonly=on");
    (*device)["drive"] = drive;
    return {};
  }
  return unplannable("QMP command " + c.name);
}

Result<std::int64_t> ColdPlan::add_fd(fdpass::BorrowedFd fd, std::string opaque) {
  fdpass::UniqueFd copy(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return make_error(std::error_code(errno, std::system_category()), "dup for -add-fd");
  const std::int64_t set = next_fdset_++;
  fds_.add_to_fdset(std::move(copy), std::move(opaque), set);
  return set;
}

std::vector<std::string> ColdPlan::args() const {
  std::vector<std::string> out = drives_;
  for (const auto& d : devices_) {
    out.push_back("-device");
    out.push_back(json::serialize(d));
  }
  return out;
}

}  // namespace broker
