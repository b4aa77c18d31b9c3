// pulumi-language-python, as Ember builds it: the Pulumi engine's language host for Python programs.
//
// Pulumi's own host lives in a nested Go module that the module proxy does not serve, so Ember writes this
// one on the same libraries (sdk/v3's gRPC protocol, RPC server and Python toolchain). It runs a program
// with the executor script that ships in sdk/v3 (pulumi-language-python-exec, installed beside this binary),
// runs Python policy packs for the engine's analyzers, and reports dependencies. Code generation, templates
// and debugging are Pulumi's tooling for authors, not for running programs, and answer Unimplemented.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"time"

	sdk "github.com/pulumi/pulumi/sdk/v3"
	"github.com/pulumi/pulumi/sdk/v3/go/common/apitype"
	"github.com/pulumi/pulumi/sdk/v3/go/common/util/cmdutil"
	"github.com/pulumi/pulumi/sdk/v3/go/common/util/rpcutil"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
	"github.com/pulumi/pulumi/sdk/v3/python/toolchain"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

// The exit code with which the executor says it already showed the user what to do.
const userActionableExit = 32

// Set at build time (-ldflags "-X main.version=..."): the Pulumi version this host goes with.
var version = "3.0.0"

type host struct {
	pulumirpc.UnimplementedLanguageRuntimeServer
	executor string // pulumi-language-python-exec
	engine   string // the engine's address, for the program and its plugins
}

func main() {
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.String("tracing", "", "accepted for compatibility; Ember's host emits no traces")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}
	self, err := os.Executable()
	if err != nil {
		cmdutil.Exit(fmt.Errorf("could not find this executable: %w", err))
	}
	h := &host{executor: filepath.Join(filepath.Dir(self), "pulumi-language-python-exec")}
	if _, err := os.Stat(h.executor); err != nil {
		cmdutil.Exit(fmt.Errorf("missing executor beside the language host: %w", err))
	}
	if flag.NArg() > 0 {
		h.engine = flag.Arg(0)
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt)
	defer cancel()
	stop := make(chan bool)
	go func() { <-ctx.Done(); close(stop) }()
	if h.engine != "" {
		// Exit when the engine goes away, as every plugin must.
		if err := rpcutil.Healthcheck(ctx, h.engine, 5*time.Minute, cancel); err != nil {
			cmdutil.Exit(fmt.Errorf("could not watch the engine: %w", err))
		}
	}
	handle, err := rpcutil.ServeWithOptions(rpcutil.ServeOptions{
		Cancel: stop,
		Init: func(srv *grpc.Server) error {
			pulumirpc.RegisterLanguageRuntimeServer(srv, h)
			return nil
		},
	})
	if err != nil {
		cmdutil.Exit(fmt.Errorf("could not start the language host: %w", err))
	}
	fmt.Printf("%d\n", handle.Port) // the engine reads the port from the first line
	if err := <-handle.Done; err != nil {
		cmdutil.Exit(err)
	}
}

// pythonFor resolves the program's Python the way Pulumi.yaml says (runtime options: virtualenv, toolchain),
// falling back to PULUMI_PYTHON_CMD or python3 on PATH.
func pythonFor(info *pulumirpc.ProgramInfo) (toolchain.Toolchain, error) {
	opts := toolchain.PythonOptions{Root: info.GetRootDirectory(), ProgramDir: info.GetProgramDirectory()}
	if options := info.GetOptions().AsMap(); options != nil {
		if venv, ok := options["virtualenv"].(string); ok {
			opts.Virtualenv = venv
		} else if options["virtualenv"] != nil {
			return nil, errors.New("the virtualenv runtime option in Pulumi.yaml must be a string")
		}
		if tc, ok := options["toolchain"]; ok && tc != "pip" {
			return nil, fmt.Errorf("toolchain %v: Ember's language host runs pip virtualenvs only", tc)
		}
	}
	return toolchain.ResolveToolchain(opts)
}

func (h *host) Handshake(ctx context.Context, req *pulumirpc.LanguageHandshakeRequest,
) (*pulumirpc.LanguageHandshakeResponse, error) {
	h.engine = req.GetEngineAddress()
	return &pulumirpc.LanguageHandshakeResponse{}, nil
}

func (h *host) GetPluginInfo(context.Context, *emptypb.Empty) (*pulumirpc.PluginInfo, error) {
	return &pulumirpc.PluginInfo{Version: version}, nil
}

// Plugins are found when the program asks for them (Ember's only plugin, the dynamic provider host, is
// installed beside the CLI), so none are announced in advance.
func (h *host) GetRequiredPlugins(context.Context, *pulumirpc.GetRequiredPluginsRequest,
) (*pulumirpc.GetRequiredPluginsResponse, error) {
	return &pulumirpc.GetRequiredPluginsResponse{}, nil
}

func (h *host) GetRequiredPackages(context.Context, *pulumirpc.GetRequiredPackagesRequest,
) (*pulumirpc.GetRequiredPackagesResponse, error) {
	return &pulumirpc.GetRequiredPackagesResponse{}, nil
}

func (h *host) Run(ctx context.Context, req *pulumirpc.RunRequest) (*pulumirpc.RunResponse, error) {
	python, err := pythonFor(req.GetInfo())
	if err != nil {
		return nil, err
	}
	if err := python.ValidateVenv(ctx); err != nil {
		return nil, err
	}
	args := []string{h.executor}
	for _, kv := range [][2]string{
		{"monitor", req.GetMonitorAddress()}, {"engine", h.engine}, {"project", req.GetProject()},
		{"root_directory", req.GetInfo().GetRootDirectory()}, {"stack", req.GetStack()}, {"pwd", req.GetPwd()},
		{"dry_run", strconv.FormatBool(req.GetDryRun())}, {"parallel", strconv.Itoa(int(req.GetParallel()))},
		{"organization", req.GetOrganization()},
	} {
		if kv[1] != "" {
			args = append(args, "--"+kv[0], kv[1])
		}
	}
	args = append(append(args, req.GetInfo().GetEntryPoint()), req.GetArgs()...)
	cmd, err := python.Command(ctx, args...)
	if err != nil {
		return nil, err
	}
	config, err := json.Marshal(withDefault(req.GetConfig()))
	if err != nil {
		return nil, err
	}
	secretKeys, err := json.Marshal(append([]string{}, req.GetConfigSecretKeys()...))
	if err != nil {
		return nil, err
	}
	cmd.Env = append(envOf(cmd), "PULUMI_CONFIG="+string(config), "PULUMI_CONFIG_SECRET_KEYS="+string(secretKeys))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return &pulumirpc.RunResponse{}, nil
	case errors.As(err, &exit) && exit.ExitCode() == userActionableExit:
		return &pulumirpc.RunResponse{Bail: true}, nil
	case errors.As(err, &exit):
		return &pulumirpc.RunResponse{Error: fmt.Sprintf("program exited with non-zero exit code: %d", exit.ExitCode())}, nil
	default:
		return &pulumirpc.RunResponse{Error: fmt.Sprintf("could not run the Python executor: %v", err)}, nil
	}
}

// withDefault gives an empty object for a stack without config: the executor reads PULUMI_CONFIG as a map.
func withDefault(config map[string]string) map[string]string {
	if config == nil {
		return map[string]string{}
	}
	return config
}

func envOf(cmd *exec.Cmd) []string {
	if cmd.Env != nil {
		return cmd.Env
	}
	return os.Environ()
}

// RunPlugin runs a Python policy pack (the engine's analyzer) or a Python plugin with the program's Python.
func (h *host) RunPlugin(req *pulumirpc.RunPluginRequest, server pulumirpc.LanguageRuntime_RunPluginServer) error {
	ctx := server.Context()
	python, err := pythonFor(req.GetInfo())
	if err != nil {
		return err
	}
	analyzer := req.GetKind() == string(apitype.AnalyzerPlugin)
	args := append([]string{req.GetInfo().GetProgramDirectory()}, req.GetArgs()...)
	if analyzer {
		args = append(append([]string{"-u", "-m", "pulumi.policy"}, req.GetArgs()...), req.GetInfo().GetProgramDirectory())
	}
	cmd, err := python.Command(ctx, args...)
	if err != nil {
		return err
	}
	closer, stdout, stderr, err := rpcutil.MakeRunPluginStreams(server, false)
	if err != nil {
		return err
	}
	defer closer.Close()
	cmd.Dir = req.GetPwd()
	var proxy *sdk.PolicyProxy
	if analyzer {
		// The engine configures a policy pack for the stack before the pack's process exists: a proxy takes
		// that call, then hands the connection to the pack once it prints its port.
		cmd.Dir = req.GetInfo().GetProgramDirectory()
		if proxy, stdout, err = sdk.NewPolicyProxy(ctx, stdout); err != nil {
			return err
		}
		stack, err := proxy.AwaitConfiguration(ctx)
		if err != nil {
			return err
		}
		cmd.Env = append(envOf(cmd), stackEnv(stack)...)
	}
	cmd.Env = append(envOf(cmd), req.GetEnv()...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		if proxy != nil {
			proxy.Abort(err)
		}
		return err
	}
	if proxy != nil {
		err = proxy.Attach(ctx, cmd)
	} else {
		err = cmd.Wait()
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return server.Send(&pulumirpc.RunPluginResponse{Output: &pulumirpc.RunPluginResponse_Exitcode{
			Exitcode: int32(exit.ExitCode())}})
	}
	return err
}

func stackEnv(stack *pulumirpc.AnalyzerStackConfigureRequest) []string {
	if stack == nil {
		return nil
	}
	env := []string{"PULUMI_DRY_RUN=" + strconv.FormatBool(stack.GetDryRun())}
	for k, v := range map[string]string{"PULUMI_ORGANIZATION": stack.GetOrganization(),
		"PULUMI_PROJECT": stack.GetProject(), "PULUMI_STACK": stack.GetStack()} {
		if v != "" {
			env = append(env, k+"="+v)
		}
	}
	if config, err := json.Marshal(stack.GetConfig()); err == nil && stack.GetConfig() != nil {
		env = append(env, "PULUMI_CONFIG="+string(config))
	}
	return env
}

func (h *host) About(ctx context.Context, req *pulumirpc.AboutRequest) (*pulumirpc.AboutResponse, error) {
	python, err := pythonFor(req.GetInfo())
	if err != nil {
		return nil, err
	}
	info, err := python.About(ctx)
	if err != nil {
		return nil, err
	}
	return &pulumirpc.AboutResponse{Executable: info.PythonExecutable, Version: info.PythonVersion.String()}, nil
}

func (h *host) GetProgramDependencies(ctx context.Context, req *pulumirpc.GetProgramDependenciesRequest,
) (*pulumirpc.GetProgramDependenciesResponse, error) {
	python, err := pythonFor(req.GetInfo())
	if err != nil {
		return nil, err
	}
	packages, err := python.ListPackages(ctx, req.GetTransitiveDependencies())
	if err != nil {
		return nil, err
	}
	deps := make([]*pulumirpc.DependencyInfo, 0, len(packages))
	for _, p := range packages {
		deps = append(deps, &pulumirpc.DependencyInfo{Name: p.Name, Version: p.Version})
	}
	return &pulumirpc.GetProgramDependenciesResponse{Dependencies: deps}, nil
}

func (h *host) InstallDependencies(req *pulumirpc.InstallDependenciesRequest,
	server pulumirpc.LanguageRuntime_InstallDependenciesServer,
) error {
	python, err := pythonFor(req.GetInfo())
	if err != nil {
		return err
	}
	closer, stdout, stderr, err := rpcutil.MakeInstallDependenciesStreams(server, req.GetIsTerminal())
	if err != nil {
		return err
	}
	defer closer.Close()
	return python.InstallDependencies(server.Context(), req.GetDirectory(), req.GetUseLanguageVersionTools(),
		true, stdout, stderr)
}
