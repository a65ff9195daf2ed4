#include "broker/lifecycle/firmware.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/errc.hpp"

namespace broker::lifecycle {
namespace {

Error field_error(std::string_view field, std::string msg) {
  Error e(make_error_code(errc::invalid_spec), std::string(field) + ": " + std::move(msg));
  e.field = std::string(field);
  return e;
}

// A firmware file of the host's OVMF package, which the broker trusts as it trusts QEMU itself.
Result<fdpass::UniqueFd> open_ovmf(const std::string& path, std::string_view field) {
  fdpass::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd) {
    return field_error(field, "uefi needs OVMF: " + path + ": " + std::strerror(errno) +
                                  " (install the ovmf package)");
  }
  return fd;
}

std::uint64_t size_of(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? static_cast<std::uint64_t>(st.st_size) : 0;
}

// The broker's store for the domain, made from the template the first time.
Result<fdpass::UniqueFd> open_store(const FirmwareConfig& config, const DomainSpec& spec,
                                    const std::string& vars_template) {
  const std::string path = nvram_store(config, spec.name, spec.secure_boot);
  if (auto ec = make_dirs(config.nvram_dir, 0700)) {
    return make_error(ec, "creating " + config.nvram_dir);
  }
  fdpass::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY));
  if (fd) return fd;
  if (errno != ENOENT) return make_error({errno, std::system_category()}, "nvram " + path);
  auto tmpl = open_ovmf(vars_template, "firmware");
  if (!tmpl) return tmpl.error();
  std::string content(size_of(tmpl->get()), '\0');
  if (content.empty() || ::pread(tmpl->get(), content.data(), content.size(), 0) !=
                             static_cast<ssize_t>(content.size())) {
    return field_error("firmware", vars_template + ": cannot read the variable store template");
  }
  const auto slash = path.rfind('/');
  if (auto ec = write_file_atomic(path.substr(0, slash), path.substr(slash + 1), content, 0600)) {
    return make_error(ec, "nvram " + path);
  }
  log::info("domain " + spec.name + ": new UEFI variable store " + path + " from " + vars_template);
  fdpass::UniqueFd made(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY));
  if (!made) return make_error({errno, std::system_category()}, "nvram " + path);
  return made;
}

}  // namespace

OvmfFiles ovmf_files(const FirmwareConfig& config, bool secure_boot) {
  // Debian's names: OVMF_CODE_4M.ms.fd is a link to the secure-boot build, and its store has
  // Microsoft's keys enrolled.
  if (secure_boot) {
    return {config.ovmf_dir + "/OVMF_CODE_4M.secboot.fd", config.ovmf_dir + "/OVMF_VARS_4M.ms.fd"};
  }
  return {config.ovmf_dir + "/OVMF_CODE_4M.fd", config.ovmf_dir + "/OVMF_VARS_4M.fd"};
}

std::string nvram_store(const FirmwareConfig& config, const std::string& name, bool secure_boot) {
  return config.nvram_dir + "/" + name + (secure_boot ? "_VARS.ms.fd" : "_VARS.fd");
}

Result<std::vector<std::string>> hand_over_uefi(const DomainSpec& spec, const FirmwareConfig& config,
                                                const fdpass::ImageRoots& roots, FdHandover& fds) {
  const OvmfFiles files = ovmf_files(config, spec.secure_boot);
  auto code = open_ovmf(files.code, "firmware");
  if (!code) return code.error();
  fdpass::UniqueFd vars;
  if (spec.nvram.empty()) {
    auto store = open_store(config, spec, files.vars_template);
    if (!store) return store.error();
    vars = std::move(*store);
  } else {
    auto opened = roots.open(spec.nvram, {.access = fdpass::Access::read_write});
    if (!opened) {
      Error e(opened.error(), "nvram: " + spec.nvram + ": " + opened.error().message());
      e.field = "nvram";
      return e;
    }
    vars = std::move(opened->fd);
  }
  // OVMF maps the store at a fixed size: anything else fails inside QEMU with a worse message.
  auto tmpl = open_ovmf(files.vars_template, "firmware");
  if (!tmpl) return tmpl.error();
  if (const auto want = size_of(tmpl->get()), got = size_of(vars.get()); want != got) {
    return field_error("nvram", "the variable store is " + std::to_string(got) + " bytes; " +
                                    files.vars_template + " is " + std::to_string(want));
  }
  fds.add_to_fdset(std::move(*code), std::string(kFirmwareCodeOpaque), kFirmwareCodeFdset);
  fds.add_to_fdset(std::move(vars), std::string(kFirmwareVarsOpaque), kFirmwareVarsFdset);
  const std::string code_set = "/dev/fdset/" + std::to_string(kFirmwareCodeFdset);
  const std::string vars_set = "/dev/fdset/" + std::to_string(kFirmwareVarsFdset);
  std::vector<std::string> args = {
      "-blockdev", "driver=file,node-name=qb-fw-code-file,filename=" + code_set + ",read-only=on",
      "-blockdev", "driver=raw,node-name=qb-fw-code,file=qb-fw-code-file,read-only=on",
      "-blockdev", "driver=file,node-name=qb-fw-vars-file,filename=" + vars_set,
      "-blockdev", "driver=raw,node-name=qb-fw-vars,file=qb-fw-vars-file",
      "-machine", "pflash0=qb-fw-code,pflash1=qb-fw-vars",
  };
  if (spec.secure_boot) {
    // The secure-boot build keeps its variables safe from the guest OS only with SMM.
    args.insert(args.end(), {"-machine", "smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"});
  }
  return args;
}

Result<void> purge_nvram(const FirmwareConfig& config, const std::string& name) {
  for (bool secure : {false, true}) {
    const std::string path = nvram_store(config, name, secure);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return make_error({errno, std::system_category()}, "removing " + path);
    }
  }
  return {};
}

}  // namespace broker::lifecycle
